#!/usr/bin/env bash
# The GPU checks in as few device calls as possible (docs/gpu.md says how the wheels get there).
#
#   bash bench/gpu_session.sh tests   # install, then tests/gpu        -> $OUT/gpu-tests.log
#   bash bench/gpu_session.sh bench   # install, then bench/train_gpu.py -> $OUT/train-gpu*.log
#                                     # (the peers, chunked loss, then LoRA and QLoRA)
#
# Run from the project root on the GPU machine. Installing is skipped when a previous call on the
# same (still warm) machine did it. The Alpaca sample is read from $SFT_BENCH_DATA, by default
# .gpu-data/alpaca_en_demo.json (an ignored folder carried with the call); $SFT_BENCH_ARGS is added
# to each bench command line (`--tiny` smoke-tests this script on a CPU).
set -uo pipefail
step=${1:?usage: gpu_session.sh tests|bench}
out=${OUT:-gpu-out}
mkdir -p "$out"
log() { echo "gpu_session: $*" | tee -a "$out/session.log"; }

install() {
  if [ -d .gpu-b ] && [ ! -e /tmp/site/flash_attn ] && [ ! -e /tmp/site/trl ]; then
    bash .gpu-b/install-on-device.sh || { log "wheel install failed"; exit 3; }
  fi
  # bitsandbytes (qlora) travels alone in .gpu-c: one 43 MB wheel, pure Python plus its CUDA libraries.
  if [ -d .gpu-c ] && [ ! -e /tmp/site/bitsandbytes ]; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpu-c/bitsandbytes-*.whl || log "bitsandbytes install failed"
  fi
  # datasets fingerprints every Dataset with dill, and dill pickles by value (and fails on
  # pyarrow's MonthDayNano) any module whose file path names no site-packages directory, which a
  # `pip install --target /tmp/site` tree does not. Reach that tree through such a name.
  if [ -d /tmp/site ]; then
    mkdir -p /tmp/py /tmp/sc-sft && ln -sfn /tmp/site /tmp/py/site-packages
    echo "import site; site.addsitedir('/tmp/py/site-packages')" > /tmp/sc-sft/sitecustomize.py
    export PYTHONPATH=/tmp/sc-sft
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || { log "pip install -e . failed"; exit 3; }
  python3 - <<'EOF' 2>&1 | tee -a "$out/session.log"
import importlib.util, torch, transformers
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
print("torch", torch.__version__, "transformers", transformers.__version__)
for name in ("flash_attn", "trl", "datasets"):
    spec = importlib.util.find_spec(name)
    print(name, "at", spec.origin if spec else "missing")
EOF
}

install
case "$step" in
  tests)
    PYTHONUNBUFFERED=1 python3 -m pytest -m gpu tests/gpu -v -rs 2>&1 | tee "$out/gpu-tests.log"
    exit "${PIPESTATUS[0]}" ;;
  bench)
    data=${SFT_BENCH_DATA:-.gpu-data/alpaca_en_demo.json}
    [ -f "$data" ] || { log "no data at $data: copy the Alpaca sample there and carry .gpu-data"; exit 2; }
    PYTHONUNBUFFERED=1 python3 bench/train_gpu.py --data "$data" ${SFT_BENCH_ARGS:-} 2>&1 | tee "$out/train-gpu.log"
    PYTHONUNBUFFERED=1 python3 bench/train_gpu.py --data "$data" ${SFT_BENCH_ARGS:-} --variants sftcore --chunked-loss 2>&1 | tee "$out/train-gpu-chunked.log"
    # qlora needs bitsandbytes (.gpu-c carried with this call); without it that variant is skipped.
    PYTHONUNBUFFERED=1 python3 bench/train_gpu.py --data "$data" ${SFT_BENCH_ARGS:-} --variants sftcore-lora,sftcore-qlora 2>&1 | tee "$out/train-gpu-adapters.log"
    ;;
  *) log "unknown step $step (tests or bench)"; exit 2 ;;
esac
