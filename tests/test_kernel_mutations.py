"""Every kernel mutation of bench/kernel_mutations.py still finds its line exactly once (the GPU
round's `kmutation` stage builds each mutant and runs the CUDA tests it must fail; a refactor that
moves or rewrites a mutated line must bring the mutation along, or the stage would test nothing)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import kernel_mutations as km  # noqa: E402


def test_every_mutation_finds_its_line_once():
    assert km.MUTATIONS, "no mutations defined"
    assert km.check_sources() == []


def test_each_mutation_changes_its_line_and_names_existing_tests():
    root = km.ROOT
    for m in km.MUTATIONS:
        assert m.old != m.new, m.name
        for path, old, new in m.also:
            assert old != new and os.path.exists(os.path.join(root, path)), (m.name, path)
        for t in m.tests:
            assert os.path.exists(os.path.join(root, t)), (m.name, t)
    assert len({m.name for m in km.MUTATIONS}) == len(km.MUTATIONS)


def test_check_sources_reports_a_missing_line(monkeypatch):
    gone = km.Mutation("gone", km.MUTATIONS[0].path, "this text is in no kernel", "x", ("tests/test_decode.py",), "-")
    monkeypatch.setattr(km, "MUTATIONS", [*km.MUTATIONS, gone])
    assert km.check_sources() == [("gone", 0)]


def test_check_sources_reports_a_missing_second_edit(monkeypatch):
    m0 = km.MUTATIONS[0]
    two = km.Mutation("two", m0.path, m0.old, m0.new, m0.tests, "-",
                      also=((m0.path, "this text is in no kernel", "x"),))
    monkeypatch.setattr(km, "MUTATIONS", [*km.MUTATIONS, two])
    assert km.check_sources() == [("two", 0)]
