#!/usr/bin/env bash
# Diagnostics for a C++ exception message with a number crashing inside dms_ext._C on the H200
# image (round 2: segfault in std::ostream<<long instantiated inside _C.so). Shows which g++
# built it and which libstdc++ the process loads, then rebuilds with the system g++ and retries.
PY=${PYTHON:-python3}
echo "== compilers"; which -a g++ gcc c++ 2>&1 | head; g++ --version | head -1; /usr/bin/g++ --version 2>&1 | head -1
$PY -c "import sysconfig; print('sysconfig CXX', sysconfig.get_config_var('CXX'))"
echo "== libstdc++ in a torch process"
$PY -c "import torch, dms_ext; print([l.split()[-1] for l in open('/proc/self/maps') if 'stdc++' in l][:1])"
strings -a $(ls /usr/lib/x86_64-linux-gnu/libstdc++.so.6 2>/dev/null) 2>/dev/null | grep -E "^GLIBCXX_3\.4\.[0-9]+$" | sort -V | tail -1
ls /opt/gcc/lib64/libstdc++.so* 2>/dev/null
nm -C dms_ext/_C*.so 2>/dev/null | grep -c "_M_insert<long>" 
cat > /tmp/diag_exc.py <<'PYEOF'
import faulthandler, torch, dms_ext
faulthandler.enable()
q = torch.randn(1, 4, 96, device="cuda", dtype=torch.bfloat16)
k = torch.randn(4, 64, 96, device="cuda", dtype=torch.bfloat16)
bt = torch.zeros(1, 2, 2, device="cuda", dtype=torch.int32); sl = torch.ones(1, 2, device="cuda", dtype=torch.int32)
print("dms_ext from", dms_ext.__file__)
try:
    torch.ops.dms.sparse_decode(q, k, k, bt, sl, 0.1); torch.cuda.synchronize(); print("D 96 no error")
except Exception as e:
    print("D 96 ->", type(e).__name__, str(e).splitlines()[0][:150])
PYEOF
echo "== as built"; $PY /tmp/diag_exc.py 2>&1 | grep -E "D 96|Fatal|from"
if [ -x /usr/bin/g++ ]; then
  echo "== rebuilt with /usr/bin/g++"
  rm -rf /tmp/alt && mkdir -p /tmp/alt && cp -r setup.py csrc dms_ext /tmp/alt/ && rm -f /tmp/alt/dms_ext/_C*.so
  (cd /tmp/alt && CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 DMS_CUDA_ARCH=90a $PY setup.py build_ext --inplace >/tmp/alt/build.log 2>&1; echo "alt build rc=$?")
  nm -C /tmp/alt/dms_ext/_C*.so 2>/dev/null | grep -c "_M_insert<long>"
  (cd /tmp/alt && PYTHONPATH=/tmp/alt:$PYTHONPATH $PY /tmp/diag_exc.py 2>&1 | grep -E "D 96|Fatal|from")
fi
