#!/usr/bin/env bash
# Diagnostics for a C++ exception thrown from a CUDA op impl (seen: a segfault instead of a
# ValueError on the H200 build). Prints a host backtrace with cuda-gdb when the process dies.
PY=${PYTHON:-python3}
cat > /tmp/diag_exc.py <<'PYEOF'
import faulthandler, torch, dms_ext
faulthandler.enable()
q = torch.randn(1, 4, 96, device="cuda", dtype=torch.bfloat16)
k = torch.randn(4, 64, 96, device="cuda", dtype=torch.bfloat16)
bt = torch.zeros(1, 2, 2, device="cuda", dtype=torch.int32); sl = torch.ones(1, 2, device="cuda", dtype=torch.int32)
for name, args in [("cpu seq_lens", (q[..., :64].contiguous(), k[..., :64].contiguous(), k[..., :64].contiguous(), bt, sl.cpu(), 0.1)),
                   ("D 96", (q, k, k, bt, sl, 0.1))]:
    try:
        torch.ops.dms.sparse_decode(*args); torch.cuda.synchronize(); print(name, "no error")
    except Exception as e:
        print(name, "->", type(e).__name__, str(e).splitlines()[0][:150])
PYEOF
$PY /tmp/diag_exc.py 2>&1 | tail -n 15
echo "rc=$?"
if command -v cuda-gdb >/dev/null; then
  timeout 90 cuda-gdb -batch -ex run -ex bt --args $PY /tmp/diag_exc.py 2>&1 | grep -E "^#|signal|Error|->" | head -n 25
fi
