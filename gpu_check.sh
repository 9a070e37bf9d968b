#!/bin/bash
# The GPU checks in one run (issue: "On a GPU: correct, then fast"), about 6 minutes on one H200 (measured):
#   1. the fast test tier with the parity and device tests on CUDA (float64 parity, SDPA vs explicit
#      attention in fp64/fp32/bf16, encode on CUDA vs float64 codes with near-ties counted);
#   2. torchrun --nproc_per_node=1 (NCCL) of train_tokenizer.py and pretrain.py, 20 steps, bf16,
#      compile off and on, beside the same runs without torchrun: losses side by side, recompiles counted;
#   3. bench.py, ViT-B/16 at 224: ours bf16 (+ compile) against the official fp16 recipe in the same process,
#      and a kernel table of the compiled full step;
#   4. each stage's run with torch.cuda.set_sync_debug_mode('error') between its log steps (no host sync);
#   5. the data path: pretrain.py, compiled, on generated 500x375 JPEGs (docs/speed.md's generator) with WORKERS
#      workers, its steady images/s beside section 3's full step; bench.py's loader beside the official one.
#     OFFICIAL_BEIT2=/path/to/unilm/beit2 OUT=gpu_out bash gpu_check.sh     # ONLY=35: sections 3 and 5 alone
#     TEST_DEVICE=cpu MODEL=beitv2_tiny_patch16_224 BATCH=4 ONLY=3 bash gpu_check.sh     # a dry run on a CPU
# The official side needs timm and einops; .official/site is added to PYTHONPATH if they are missing.
set -u
OUT=${OUT:-gpu_out}
OFFICIAL=${OFFICIAL_BEIT2:-.official/beit2}
TEST_DEVICE=${TEST_DEVICE:-cuda} MODEL=${MODEL:-beitv2_base_patch16_224} BATCH=${BATCH:-128} ONLY=${ONLY:-12345}
WORKERS=${WORKERS:-14} JPEGS=${JPEGS:-6000} JPEG_STEPS=${JPEG_STEPS:-100}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -c 'import timm, einops' 2>/dev/null || export PYTHONPATH=$PWD/.official/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)'
  nproc; } 2>&1 | tee "$OUT/env.txt"

# 1 and 2 run together (neither is timed); 3, 4 and 5 run alone afterwards.
if [[ $ONLY == *1* ]]; then
echo "== 1. fast test tier, parity and device tests on CUDA"
(BEITV2_TEST_DEVICE=$TEST_DEVICE timeout 200 python3 -m pytest -q -s -m 'not slow' -p no:cacheprovider test_beitv2.py \
    > "$OUT/pytest.log" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.log") &

echo "== 2. torchrun vs one process, 20 steps, bf16"
TR='python3 -m torch.distributed.run --nproc_per_node=1 --master_port'
STEPS="--steps=20 --log_every=1 --dtype=bf16 --workers=2"
(
  timeout 200 python3 train_tokenizer.py $STEPS --out_dir=$W/tok > $W/tok.log 2>&1; echo "tok exit $?"
  timeout 200 $TR=29501 train_tokenizer.py $STEPS --out_dir=$W/tok_ddp > $W/tok_ddp.log 2>&1 & p1=$!
  TORCH_LOGS=recompiles,graph_breaks timeout 240 $TR=29502 train_tokenizer.py $STEPS --compile=True \
      --out_dir=$W/tok_ddp_compile > $W/tok_ddp_compile.log 2>&1 & p2=$!
  P="--tokenizer=$W/tok/ckpt.pt"
  timeout 200 python3 pretrain.py $STEPS $P --out_dir=$W/pre > $W/pre.log 2>&1 & p3=$!
  timeout 200 $TR=29503 pretrain.py $STEPS $P --out_dir=$W/pre_ddp > $W/pre_ddp.log 2>&1 & p4=$!
  TORCH_LOGS=recompiles,graph_breaks timeout 240 $TR=29504 pretrain.py $STEPS $P --compile=True \
      --out_dir=$W/pre_ddp_compile > $W/pre_ddp_compile.log 2>&1 & p5=$!
  for p in $p1 $p2 $p3 $p4 $p5; do wait $p; echo "exit $?"; done
) > "$W/torchrun_exits.txt" 2>&1
wait
python3 - "$W" <<'EOF' 2>&1 | tee "$OUT/torchrun.txt"
import json, os, re, sys
w = sys.argv[1]
print(open(os.path.join(w, 'torchrun_exits.txt')).read().strip().replace('\n', ', '))
for stage, key in (('tok', 'loss'), ('pre', 'loss')):
    runs = {}
    for tag in ('', '_ddp', '_ddp_compile'):
        path = os.path.join(w, stage + tag, 'log.jsonl')
        runs[stage + tag] = [json.loads(l)[key] for l in open(path)] if os.path.exists(path) else []
        log = open(os.path.join(w, stage + tag + '.log')).read()
        print(f'{stage + tag:18s} recompiles {len(re.findall("Recompiling function", log))}, '
              f'graph breaks {len(re.findall("Graph break in user code", log))}, '
              f'last line: {log.strip().splitlines()[-1:]}')
    base = runs[stage]
    for tag, losses in runs.items():
        n = min(len(base), len(losses))
        diff = max((abs(a - b) for a, b in zip(base, losses)), default=float('nan'))
        print(f'  {tag:18s} {len(losses)} logged steps, loss first {losses[:1]}, last {losses[-1:]}, '
              f'max |diff| vs one process over {n} steps: {diff:.2e}')
EOF
tail -3 "$OUT/pytest.log"
grep -h "codes differ" "$OUT/pytest.log"
fi

if [[ $ONLY == *3* ]]; then
echo "== 3. speed, $MODEL, batch $BATCH"
BENCH="python3 bench.py --model=$MODEL --batch_size=$BATCH --steps=10 --warmup=3"
{ timeout 260 $BENCH --dtype=bf16 --compile=True --what=pretrain --official=$OFFICIAL --profile=True
  timeout 100 $BENCH --dtype=bf16 --what=pretrain --official=$OFFICIAL
} 2>&1 | grep -v Warning | tee "$OUT/bench.log"
fi

if [[ $ONLY == *4* ]]; then
echo "== 4. no host sync between log steps: set_sync_debug_mode('error') at every other step of each stage"
python3 - <<'EOF' 2>&1 | grep -E "SYNC CHECK" | tee "$OUT/sync.txt"
import torch, common, evaluate, pretrain, train_tokenizer
LOG, STEPS, steps, get_lr = 5, 20, [], common.get_lr
def guarded(step, *a, **k):  # fit asks the lr of each step first: 'error' unless it is the first, a log or the last
    steps.append(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error' if len(steps) > 1 and len(steps) % LOG else 'default')
    return get_lr(step, *a, **k)
common.get_lr = guarded
run = ['--dtype=bf16', f'--steps={STEPS}', f'--log_every={LOG}', '--ckpt_every=1000', '--workers=2']
for name, main, args in [('tokenizer', train_tokenizer.main, ['--out_dir=/tmp/s_tok']),
                         ('pretrain', pretrain.main, ['--tokenizer=/tmp/s_tok/ckpt.pt', '--out_dir=/tmp/s_pre']),
                         ('finetune', evaluate.main, ['--mode=finetune', '--checkpoint=/tmp/s_pre/ckpt.pt', '--lr=1e-3',
                                                      '--eval_every=0', '--out_dir=/tmp/s_ft'])]:
    steps.clear()
    try:
        main(run + args)
        print(f'SYNC CHECK {name}: {len(steps)} steps, no host sync between log steps', flush=True)
    except Exception as e:  # the sync error names the operation
        print(f'SYNC CHECK {name}: FAILED at step {len(steps)}: {type(e).__name__}: {str(e)[:300]}', flush=True)
    finally:
        torch.cuda.set_sync_debug_mode('default')
EOF
fi

if [[ $ONLY == *5* ]]; then
echo "== 5. data path: pretrain.py on $JPEGS generated 500x375 JPEGs, $WORKERS workers, beside section 3's full step"
python3 - "$W/jpegs" "$JPEGS" <<'EOF'
import multiprocessing, os, sys, numpy as np
from PIL import Image
H, W = 375, 500
def make(i):  # docs/speed.md's generator: 1/f noise, ~96 KB at quality 85
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(W), np.fft.fftfreq(H)))
    f[0, 0] = 1
    g = np.random.default_rng(i)
    base, own = (np.real(np.fft.ifft2(np.fft.fft2(g.normal(size=s)) / f)) for s in ((H, W), (3, H, W)))
    img = 0.7 * base + 0.3 * own
    img = (img - img.mean()) / img.std() * 50 + g.uniform(80, 170)
    os.makedirs(d := f'{sys.argv[1]}/train/c{i % 10}', exist_ok=True)
    Image.fromarray(img.transpose(1, 2, 0).clip(0, 255).astype(np.uint8)).save(f'{d}/{i}.JPEG', quality=85)
with multiprocessing.Pool() as pool:
    pool.map(make, range(int(sys.argv[2])))
EOF
python3 - "$W/vqkd.pt" <<'EOF'  # random weights: the targets cost what a trained ViT-B/16 tokenizer's cost
import dataclasses, sys, torch, beitv2
cfg = beitv2.PRESETS['vqkd_encoder_base_decoder_3x768x12_clip']
torch.save(dict(model=beitv2.VQKD(cfg).state_dict(), model_config=dataclasses.asdict(cfg)), sys.argv[1])
EOF
{ timeout 200 python3 bench.py --what=loader --data=$W/jpegs --workers=$WORKERS --batch_size=$BATCH --steps=20 \
      --official=$OFFICIAL
  timeout 500 python3 pretrain.py --model=$MODEL --data=$W/jpegs --tokenizer=$W/vqkd.pt --batch_size=$BATCH \
      --dtype=bf16 --compile=True --workers=$WORKERS --steps=$JPEG_STEPS --warmup_steps=10 --log_every=10 \
      --ckpt_every=100000 --out_dir=$W/pre_jpegs | tail -2
  python3 - "$W/pre_jpegs/log.jsonl" $BATCH <<'EOF'
import json, sys  # the logger's img_per_s counts from the run's start: the rate between later log lines instead
rows = [r for r in map(json.loads, open(sys.argv[1])) if 'img_per_s' in r]
t = [r['step'] * int(sys.argv[2]) / r['img_per_s'] for r in rows]  # seconds since the start at each log line
half = (len(rows) - 1) // 2  # from the middle on: past compilation and the first epoch
print(f'pretrain.py, steps {rows[half]["step"]}-{rows[-1]["step"]}: '
      f'{(rows[-1]["step"] - rows[half]["step"]) * int(sys.argv[2]) / (t[-1] - t[half]):.0f} img/s')
EOF
  grep -h "full step" "$OUT/bench.log" | head -1
} 2>&1 | grep -v Warning | tee "$OUT/data_path.log"
fi
tar czf "$OUT/logs.tgz" -C "$W" --exclude=jpegs .
echo "== done"
