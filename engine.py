"""The training engine every stage shares, as MAE's engine and misc: `Env` (where this process runs:
rank, device, dtype, the OUT_DIR lock, Ctrl-C and SIGTERM), the optimizer's groups and lr schedule,
checkpoints (safe reading, atomic writing, exact resume), log lines, and the loop: `plan` (the steps
a run will take, said before it starts) and `fit` (the training loop of every stage)."""
import contextlib
import fcntl
import functools
import hashlib
import importlib
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import beitv2
from settings import die

# ----------------------------------------------------- where this process runs


def cpu_has_fast_bf16():  # AVX-512 BF16 or AMX (Linux); elsewhere bf16 is emulated, ~5x slower
    return (os.path.exists('/proc/cpuinfo')
            and bool(re.search(r'avx512_bf16|amx_bf16', open('/proc/cpuinfo').read())))


class Env:
    """Where and how this process runs: its rank under torchrun (DDP: nccl on CUDA, gloo on CPU),
    device, autocast dtype and seeds. It holds OUT_DIR (its lock) and answers Ctrl-C and SIGTERM
    (on_signal)."""

    def __init__(self, device='', dtype='fp32', seed=0, out_dir='', compile=False):
        cuda = torch.cuda.is_available() and device != 'cpu'
        known = re.fullmatch(r'(cpu|cuda(:\d+)?)?', device)
        if not known or (device.startswith('cuda') and not cuda):
            die(f"--device={device!r}: must be cpu, or cuda / cuda:N where the machine has CUDA "
                "('' = cuda if any)")
        self.ddp = 'RANK' in os.environ
        self.rank, self.world = int(os.getenv('RANK', 0)), int(os.getenv('WORLD_SIZE', 1))
        self.master = self.rank == 0
        self.device = torch.device(f'cuda:{os.getenv("LOCAL_RANK", 0)}' if cuda else 'cpu')
        if cuda:
            torch.cuda.set_device(self.device)
            # fp32 stays fp32 (the codebook, k-means, the losses, --dtype=fp32); the tests set the
            # same
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        elif compile:  # torch's compiler looks for CUDA as it loads and says so on a CPU: not news
            with contextlib.redirect_stderr(io.StringIO()):
                importlib.import_module('torch.utils.cpp_extension')
        if self.ddp:
            dist.init_process_group('nccl' if cuda else 'gloo')
        self.dtype = dtype or ('bf16' if cuda or cpu_has_fast_bf16() else 'fp32')
        self.amp_dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[self.dtype]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == 'fp16')
        torch.manual_seed(seed + self.rank)  # per rank: drop path, k-means draws
        random.seed(seed + self.rank)
        self.lock = claim_out_dir(out_dir) if out_dir and self.master else None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, functools.partial(on_signal, os.getpid()))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def target_autocast(self):
        """Pretraining targets: fp16 on CUDA under mixed precision, as the official engine (bf16
        flips more near-tie codes: docs/speed.md); elsewhere the step's own."""
        if self.device.type == 'cuda' and self.amp_dtype is not None:
            return torch.autocast('cuda', dtype=torch.float16)
        return self.autocast()

    def print(self, *a):
        if self.master:
            print(*a, flush=True)

    def all_reduce(self, t):
        if self.ddp:
            dist.all_reduce(t)
        return t

    def close(self):
        if self.lock in HELD:  # another run may take the folder now
            HELD.pop(self.lock).close()
        if self.ddp:
            dist.destroy_process_group()


# Ctrl-C (SIGINT) and SIGTERM (what timeout, SLURM, docker stop and Kubernetes send). While fit
# trains in one process, the step under way ends and is saved, then the run stops. Elsewhere, and
# under DDP (the ranks would have to agree on a step, a collective every step), the process stops at
# once: the last checkpoint stands.
graceful = False  # fit sets it while it trains in one process
stop_signal = 0  # the signal that asked fit to stop after this step


def on_signal(pid, signum, frame):
    global stop_signal
    if os.getpid() != pid:  # a DataLoader worker: the main process ends it
        return
    if not graceful or stop_signal:  # a second one stops at once
        print(f'{signal.Signals(signum).name}: stopped; the last checkpoint written, if any, '
              'stands', file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    stop_signal = signum


HELD = {}  # the OUT_DIR/lock files this process holds open, locked


def claim_out_dir(out_dir):
    """Create OUT_DIR and hold an exclusive lock on OUT_DIR/lock ('pid@host' inside) while this run
    writes there, so that a second run on the same folder stops at start instead of interleaving
    checkpoints and logs. The system drops the lock when the process ends, however it ends. -> the
    lock's path."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.realpath(os.path.join(out_dir, 'lock'))
        f = HELD.get(path) or open(path, 'a+')  # held already: main called twice in a process
    except OSError as e:
        die(f'--out_dir={out_dir}: cannot create it ({e.strerror})')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or '?'
        die(f'{out_dir} is in use by another run (process {holder}): choose another --out_dir')
    f.truncate(0)
    f.write(f'{os.getpid()}@{socket.gethostname()}')
    f.flush()
    HELD[path] = f
    return path

# ------------------------------------------------------ optimizer, lr schedule


def layer_id(name, depth):
    """Official layer ids for layer-wise lr decay: embeddings 0, block l -> l + 1, the rest depth +
    1."""
    m = re.search(r'(?:^|\.)blocks\.(\d+)\.', name)
    if m:
        return int(m.group(1)) + 1
    if name.split('.')[-1] in ('cls_token', 'mask_token', 'pos_embed') or 'patch_embed.' in name:
        return 0
    return depth + 1


def param_groups(model, weight_decay, layer_decay=1.0, depth=0,
                 no_decay=('cls_token', 'pos_embed')):
    """AdamW groups as the official optim_factory: no weight decay for 1-D parameters, biases and
    the names in no_decay (mask_token and the shared relative position table ARE decayed). Each
    group's lr_scale is layer_decay ** (depth + 1 - layer id); depth 0 (no layer decay): one layer,
    so the groups hold the parameters in the model's order."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith('.bias') or name.split('.')[-1] in no_decay
        lid = layer_id(name, depth) if depth else 0
        if (lid, no_wd) not in groups:
            groups[lid, no_wd] = dict(params=[], weight_decay=0.0 if no_wd else weight_decay,
                                      lr_scale=layer_decay ** (depth + 1 - lid))
        groups[lid, no_wd]['params'].append(p)
    return list(groups.values())


def adamw(model, cfg, lr, **groups):
    """AdamW on param_groups(model, cfg.weight_decay, **groups) at peak lr `lr`, with --betas;
    fused: one kernel per step."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, **groups), lr=lr,
                             betas=cfg.betas, fused=True)


def get_lr(step, cfg, lr):
    """The lr of a step: linear warmup from 0 to `lr` (the peak), then down to --min_lr by a cosine,
    per step (official cosine_scheduler). 'poly': mmcv's PolyLrUpdaterHook, power 1 (the official
    segmentation schedule): a linear decay over all steps, its linear warmup (ratio 1e-6) scaling
    it. 'cosine_epoch': torch's CosineAnnealingLR stepped once per epoch, no warmup (BEiT v1's
    linear probe)."""
    min_lr, steps, warmup = cfg.min_lr, cfg.steps, cfg.warmup_steps

    def cosine(angle):  # lr at angle 0 down to min_lr at pi
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(angle))
    if cfg.schedule == 'poly':
        decayed = min_lr + (lr - min_lr) * (1 - step / steps)
        if step < warmup:
            return decayed * (1 - (1 - step / warmup) * (1 - 1e-6))
        return decayed
    if cfg.schedule == 'cosine_epoch':
        epoch = step * cfg.epochs // steps
        return cosine(math.pi * epoch / cfg.epochs)
    if step < warmup:
        return lr * step / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return cosine(math.pi * t)


def optimizer_step(env, optimizer, clip_grad):
    """Unscale (fp16), clip (0 = no clip; the norm is measured anyway), step, zero the grads. -> the
    gradient norm, a tensor: reading it would make the host wait for the device."""
    env.scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']],
                                           clip_grad or float('inf'))
    env.scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
    env.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return gnorm

# ----------------------------------------------------------------- checkpoints


def read_checkpoint(path):
    """beitv2.load_file (no code runs) with a one-line error: a missing, truncated or foreign file,
    or one that would run code, ends the run naming it."""
    if not os.path.isfile(path):
        die(f'{path}: no such file')
    junk = f'{path}: not a readable checkpoint (truncated, or not a PyTorch file)'
    try:
        return beitv2.load_file(path)
    except pickle.UnpicklingError:  # a zip checkpoint names the callables it would call
        try:
            code = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint at all
            die(junk)
        if not code:
            die(junk)
        die(f'{path}: refused to load: it would run code ({", ".join(code)}); a checkpoint holds '
            'only tensors and plain containers')
    except Exception:  # whatever torch raises on junk: random bytes can raise almost anything
        die(junk)


def read_tokenizer(path, device):
    """A frozen tokenizer (ours or an official vqkd_*.pth) on `device`, or one line saying why
    not."""
    try:
        return beitv2.load_tokenizer(read_checkpoint(path)).to(device)
    except (ValueError, KeyError) as e:
        die(f'tokenizer {path}: {e}')


def read_backbone(path, ckpt=None, **changes):
    """beitv2.load_backbone of a file (ours, official, timm's), or of `ckpt` (made of the file at
    `path`), or one line saying why not."""
    if ckpt is None:
        ckpt = read_checkpoint(path)
    try:
        return beitv2.load_backbone(ckpt, **changes)
    except (ValueError, KeyError) as e:
        die(f'{path}: {e}')


def rng_state():  # this process's RNG states as tensors (the checkpoint loads with weights_only)
    s = dict(torch=torch.get_rng_state(),
             python=torch.tensor(random.getstate()[1], dtype=torch.int64))
    if torch.cuda.is_available():
        s['cuda'] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    torch.set_rng_state(s['torch'])
    random.setstate((3, tuple(s['python'].tolist()), None))
    if 'cuda' in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s['cuda'])


def save_checkpoint(path, env, **state):
    """Every rank's RNG state is gathered; rank 0 writes atomically (a temporary file, then a
    rename)."""
    rngs = [rng_state()] * env.world
    if env.ddp:
        dist.all_gather_object(rngs, rngs[0])
    if not env.master:
        return
    tmp = path + '.tmp'
    try:
        torch.save(dict(state, rng=rngs, world=env.world), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk reads "unexpected pos" in torch's words
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        die(f'could not write {path}: {str(e).splitlines()[0][:120]}; {free:.0f} MiB free on its '
            'disk (no space left?); the previous checkpoint, if any, is intact')


# how a run is run, not what it computes: these may differ on resume; any other setting that differs
# from the checkpoint's is refused unless --allow_change names it
RUN_ONLY = ('preset', 'out_dir', 'resume', 'allow_change', 'log_every', 'ckpt_every', 'eval_every',
            'stop_after', 'workers', 'device', 'compile')


def digest(path):  # a file's content, in 16 hex digits
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()[:16]


def input_digests(cfg):
    """The content of the files the run starts from (its settings declared with input_file)."""
    paths = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get('input')}
    return {name: digest(path) for name, path in paths.items() if os.path.isfile(path)}


def check_same_run(cfg, env, ckpt, path, inputs):
    """One line naming the first setting that differs from the checkpoint's: a value, the world
    size, or the content of an input file (--checkpoint, --tokenizer, ...)."""
    allowed = {k.strip() for k in cfg.allow_change.split(',')}
    saved = dict(ckpt['config'], world=ckpt['world'])
    for key, value in dict(asdict(cfg), world=env.world).items():
        if key in RUN_ONLY or key in allowed or key not in saved:
            continue
        old = saved[key]
        if isinstance(value, tuple) and isinstance(old, list):
            old = tuple(old)
        if old != value:
            name = 'ranks (world size)' if key == 'world' else f'--{key}'
            die(f'{name} is {value!r} but {path} was written with {old!r}: resume with the same '
                f'setting, start a new --out_dir, or pass --allow_change={key} if the change is '
                'intended (e.g. more --steps)')
    for key, old in ckpt['inputs'].items():
        if key in inputs and inputs[key] != old and key not in allowed:
            die(f'--{key}={getattr(cfg, key)} holds other weights than when {path} was written '
                f'(its content changed): start a new --out_dir, or pass --allow_change={key} to go '
                'on with the new file')


def resume(cfg, env, model, optimizer, inputs):
    """Continue from --resume=PATH, or from OUT_DIR/ckpt.pt when there is one: the weights, the
    optimizer, the loss scaler and each rank's RNG states, after checking that it is the same run.
    -> the step to start from."""
    path = cfg.resume or os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        if cfg.resume:
            die(f'--resume: {path} does not exist')
        return 0
    ckpt = read_checkpoint(path)
    stage = script_name(cfg)
    if ckpt.get('stage') != stage:
        die(f'{path} was written by {ckpt.get("stage")}, not {stage}: pass one of its own '
            'checkpoints, or another --out_dir')
    try:
        check_same_run(cfg, env, ckpt, path, inputs)
        beitv2.load_state(model, ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        die(f'cannot resume from {path}: {e}')
    env.scaler.load_state_dict(ckpt['scaler'])
    if ckpt['world'] == env.world:
        set_rng_state(ckpt['rng'][env.rank])
    else:
        env.print(f'note: checkpoint written by {ckpt["world"]} ranks, now {env.world}: RNG not '
                  'restored')
    env.print(f'resumed from {path} at step {ckpt["step"]}')
    if ckpt['step'] >= cfg.steps:
        env.print(f'note: this run was already complete ({ckpt["step"]} of {cfg.steps} steps): '
                  'nothing to train. To train again, start a new --out_dir; to train longer, pass '
                  'more --steps with --allow_change=steps')
    return ckpt['step']


def script_name(cfg):  # the stage script whose Config cfg is: pretrain.py, ...
    return os.path.basename(sys.modules[type(cfg).__module__].__file__)

# ---------------------------------------------------- log lines, all ranks' outputs


def read_log(path, note=print):
    """The rows of a log.jsonl; a line cut short (a full disk, a kill while writing) is dropped with
    a note."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.strip():
                    note(f'note: {path} line {i} is cut short: dropped')
    return rows


class Logger:
    """Rank 0: a line per log step, and the same numbers in OUT_DIR/log.jsonl; a resumed run first
    drops the lines after its checkpoint's step."""

    def __init__(self, out_dir, env, start_step):
        self.env, self.path = env, os.path.join(out_dir, 'log.jsonl')
        if env.master and os.path.exists(self.path):
            rows = read_log(self.path, env.print)
            with open(self.path, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows if r.get('step', 0) <= start_step)

    def __call__(self, step, row, total=''):
        if not self.env.master:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(dict(row, step=step)) + '\n')
        shown = [f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()]
        print(f'step {step}{total and f"/{total}"} | ' + ' | '.join(shown), flush=True)


PROGRESS_EVERY = 10.0  # seconds


def progress(env, what, total):
    """-> tick(i): 'WHAT: i/total, about N s left', at most every PROGRESS_EVERY s (rank 0): a long
    phase shows it lives."""
    t0 = last = time.time()

    def tick(i):
        nonlocal last
        if time.time() - last >= PROGRESS_EVERY and i < total:
            last = time.time()
            env.print(f'{what}: {i}/{total}, about {(last - t0) / i * (total - i):.0f} s left')
    return tick

@torch.no_grad()
def gather(fn, dataset, cfg, env, what):
    """fn(images) -> (B, ...) for every image of `dataset` (items: image, label), each rank a share,
    gathered on all ranks in the dataset's order. -> (outputs, labels). Scoring uses it."""
    mine = torch.utils.data.Subset(dataset, range(env.rank, len(dataset), env.world))
    feats, labels = [], []
    loader = torch.utils.data.DataLoader(mine, cfg.batch_size, num_workers=cfg.workers)
    tick = progress(env, f'  {what}, batches', len(loader))
    for i, (x, y) in enumerate(loader, 1):
        with env.autocast():
            feats.append(fn(x.to(env.device)).float())
        labels.append(y.to(env.device))
        tick(i)
    shape = feats[0].shape[1:]
    labels = torch.cat(labels)[:, None].float()
    f = torch.cat([torch.cat(feats).flatten(1), labels], 1)  # the labels: a last column
    if env.ddp:  # pad to equal length, gather, drop the padding, restore the dataset's order
        n = math.ceil(len(dataset) / env.world)
        padded = torch.cat([f, f.new_zeros(n - len(f), f.shape[1])])
        parts = [torch.empty_like(padded) for _ in range(env.world)]
        dist.all_gather(parts, padded)
        f = torch.stack(parts, 1).flatten(0, 1)[:len(dataset)]  # rank r held r, r + world, ...
    return f[:, :-1].view(-1, *shape), f[:, -1].long()


# -------------------------------------------------------------------- the loop


def plan(cfg, env, loader, optimizer):
    """Sets cfg.steps and cfg.warmup_steps from an epoch recipe's epochs (unless --steps or
    --warmup_steps were given), then says on rank 0: the settings, the effective batch, the steps
    and the peak lr (the optimizer's lr times the largest lr_scale of its groups). -> steps per
    epoch."""
    per_step = cfg.batch_size * cfg.accum * env.world
    steps_per_epoch = len(loader) // cfg.accum
    if steps_per_epoch == 0:
        die(f'{len(loader.dataset)} images are fewer than one step of {per_step}: lower '
            '--batch_size')
    for key, epochs in (('steps', cfg.epochs), ('warmup_steps', cfg.warmup_epochs)):
        if getattr(cfg, key) is None:
            setattr(cfg, key, epochs * steps_per_epoch)
        elif epochs:
            env.print(f"note: --{key}={getattr(cfg, key)} replaces the preset's {epochs} epochs "
                      f'({epochs * steps_per_epoch} steps)')
    env.print('settings other than the defaults: ' + ', '.join(
        f'{f.name}={getattr(cfg, f.name)!r}' for f in fields(cfg)
        if getattr(cfg, f.name) != f.default))
    peak = optimizer.defaults['lr'] * max(g['lr_scale'] for g in optimizer.param_groups)
    env.print(f'{env.world} rank(s) on {env.device}, {env.dtype}; effective batch {per_step} '
              f'({cfg.batch_size} x {cfg.accum} accum x {env.world}); {steps_per_epoch} steps per '
              f'epoch; {cfg.steps} steps, {cfg.warmup_steps} warmup; peak lr {peak:.3g}')
    if cfg.recipe_batch and cfg.recipe_batch != per_step:  # presets are per rank
        accum = cfg.recipe_batch / (cfg.batch_size * env.world)
        fix = f'batch_size x accum x ranks = {cfg.recipe_batch}'
        if accum == round(accum):
            fix = f'--accum={accum:.0f}'
        env.print(f'note: the recipe runs {cfg.recipe_batch} images per step, this run {per_step}: '
                  f'{fix} matches it')
    if cfg.steps < cfg.warmup_steps:
        env.print(f'note: {cfg.steps} steps of a {cfg.warmup_steps}-step warmup: the lr stops at '
                  f'{peak * (cfg.steps - 1) / cfg.warmup_steps:.3g}, below its peak')
    if cfg.compile:
        env.print('note: --compile=True: the first step compiles the model (minutes on a CPU)')
    return steps_per_epoch


def stream(loader, step, accum):
    """The micro-batches from optimizer step `step` on, epoch after epoch: a resumed run continues
    mid-epoch at the same sample (data.ResumableSampler skips what was seen)."""
    steps_per_epoch = len(loader) // accum
    epoch, done = divmod(step, steps_per_epoch)
    while True:
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = done * accum * loader.batch_size
        yield from itertools.islice(loader, (steps_per_epoch - done) * accum)
        epoch, done = epoch + 1, 0


def fit(cfg, env, model, optimizer, loader, train_step, score=None, at_log=None):
    """The training loop of every stage, as MAE's engine: each step its lr, micro-steps, optimizer
    step, then a log line, a checkpoint and an evaluation when due, until --steps; resumed from
    OUT_DIR/ckpt.pt if there is one. train_step(model, batch) -> (loss, stats): a micro-batch's loss
    and a dict of tensors for the log line. score(model) -> the scores on the val split, a dict
    whose first one judges the best (higher is better). at_log(step) -> more numbers for the log
    line. -> dict(step): with score, also the final scores, best_NAME and best_step, once the run is
    complete."""
    global graceful, stop_signal
    inputs = input_digests(cfg)
    step = start = resume(cfg, env, model, optimizer, inputs)
    best = None
    best_path = os.path.join(cfg.out_dir, 'best.pt')
    if start and os.path.exists(best_path):  # a resumed run's best so far
        best = read_checkpoint(best_path)['scores']
    ddp = DDP(model) if env.ddp else model  # under torchrun: the ranks average their gradients
    run = torch.compile(ddp) if cfg.compile else ddp
    batches = stream(loader, step, cfg.accum)
    log = Logger(cfg.out_dir, env, step)
    bad = torch.zeros((), dtype=torch.long, device=env.device)  # the first non-finite step
    t0 = t_log = time.time()
    waited = 0.0  # seconds spent waiting for batches since the last log line
    graceful, stop_signal = not env.ddp, 0

    def save(name, **state):
        save_checkpoint(os.path.join(cfg.out_dir, name), env, model=model.state_dict(), step=step,
                        config=asdict(cfg), model_config=asdict(model.cfg) if model.cfg else None,
                        stage=script_name(cfg), inputs=inputs, **state)

    def evaluate():  # -> the scores; the best so far kept, with --eval_every its weights too
        nonlocal best
        scores = score(model)
        if step > start:
            log(step, {f'val_{k}': v for k, v in scores.items()})
        first = next(iter(scores))
        if best is None or scores[first] > best[first]:
            best = dict(scores, step=step)
            if cfg.eval_every:  # official checkpoint-best
                save('best.pt', scores=best)
        return scores
    while step < cfg.steps:
        # lr: the schedule's, times each parameter group's lr_scale (layer-wise lr decay)
        lr = get_lr(step, cfg, optimizer.defaults['lr'])  # the peak: the optimizer's lr
        for g in optimizer.param_groups:
            g['lr'] = lr * g['lr_scale']
        # micro-steps: --accum batches add their gradients; under DDP the ranks average them on the
        # last
        model.train()
        for micro in range(cfg.accum):
            t = time.time()
            batch = next(batches)
            waited += time.time() - t
            sync = not env.ddp or micro == cfg.accum - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with env.autocast():  # the forward pass only, as torch.amp advises
                    loss, stats = train_step(run, batch)
                env.scaler.scale(loss / cfg.accum).backward()
        # optimizer step
        gnorm = optimizer_step(env, optimizer, cfg.clip_grad)
        step += 1
        if cfg.compile and step == start + 1:
            env.print(f'compiled: the first step took {time.time() - t0:.0f} s')
        # The loss and the gradient norm stay on the device: reading them (.item()) would make the
        # host wait for the device every step. Whether they are finite is gathered there, and read
        # with the log line.
        ok = loss.isfinite() & (gnorm.isfinite() | env.scaler.is_enabled())  # fp16 skips inf
        bad = torch.where((bad == 0) & ~ok, step, bad)
        stop = stop_signal or (cfg.stop_after and step - start >= cfg.stop_after)
        due_log = step % cfg.log_every == 0 or step == cfg.steps
        due_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps or stop
        due_eval = score and (step == cfg.steps or cfg.eval_every and step % cfg.eval_every == 0)
        if due_log or due_ckpt or due_eval:
            check_finite(bad, model if due_ckpt else None, cfg)
        # log: one read of the device for all the numbers
        if due_log:
            loss_now, gnorm_now, *values = torch.stack([
                loss.detach().float(), gnorm.float(), *(v.detach().float() for v in stats.values())
            ]).tolist()
            row = dict(loss=loss_now, **dict(zip(stats, values)))
            if at_log:
                row.update(at_log(step))
            now = time.time()
            elapsed, seconds = now - t_log, now - t0  # since the last line, since the start
            images = cfg.batch_size * cfg.accum * env.world * (step - start)
            row.update(lr=max(g['lr'] for g in optimizer.param_groups), gnorm=gnorm_now,
                       data_wait=waited / elapsed, img_per_s=images / seconds,
                       eta_min=(cfg.steps - step) * seconds / (step - start) / 60)
            log(step, row, cfg.steps)
            if waited > elapsed / 2:
                env.print(f'note: {waited / elapsed:.0%} of the time went to waiting for batches: '
                          f'more --workers (now {cfg.workers}) may help')
            t_log, waited = time.time(), 0.0
        # checkpoint, then evaluate: an error while scoring loses no training
        if due_ckpt:
            save('ckpt.pt', optimizer=optimizer.state_dict(), scaler=env.scaler.state_dict())
        if stop_signal:
            graceful = False
            env.print(f'interrupted at step {step}: {cfg.out_dir}/ckpt.pt holds it; the same '
                      'command resumes')
            raise SystemExit(128 + stop_signal)
        if due_eval:
            scores = evaluate()
        if stop and step < cfg.steps:
            break
    graceful = False
    if step < cfg.steps:  # --stop_after
        return dict(step=step)
    env.print(f'done: {step} steps ({step - start} in this run, {time.time() - t0:.0f} s); '
              f'{cfg.out_dir}/ckpt.pt')
    if not score:
        return dict(step=step)
    if step == start:  # a complete run, resumed: its scores again
        scores = evaluate()
    first = next(iter(scores))  # the score that judges the best
    return dict(step=step, **scores, **{f'best_{first}': best[first]}, best_step=best['step'])


def check_finite(bad, model, cfg):
    """Stop at the first non-finite loss or gradient norm (or, before a checkpoint, weights), saying
    what the last checkpoint holds: it may have diverged already."""
    step = bad.item()
    if not step and model is not None:
        if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
            step = 'this one'
    if not step:
        return
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        die(f'non-finite loss at step {step}: stopping; no checkpoint was written yet (lower '
            '--lr?)')
    ckpt = read_checkpoint(path)
    w = max(v.abs().max().item() for v in ckpt['model'].values()
            if v.is_floating_point() and v.numel())
    held = 'non-finite weights' if not math.isfinite(w) else f'weights up to |w| = {w:.3g}'
    die(f'non-finite loss at step {step}: stopping; the last checkpoint, {path} (step '
        f'{ckpt["step"]}), holds {held} (lower --lr?)')
