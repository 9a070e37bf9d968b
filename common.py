"""What the three stage scripts share: `--key=value` settings with their ranges and choices, the
process's place (DDP, device, dtype), the OUT_DIR lock, optimizer groups and the lr schedule,
checkpoints (safe reading, atomic writing, exact resume) and logging. Model code is in beitv2.py,
data in data.py."""
import ast
import atexit
import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict, field, fields

import torch
import torch.distributed as dist

import beitv2


def die(msg):
    """Bad input: one clear line on stderr and exit code 2, instead of a traceback."""
    print(f'error: {msg}', file=sys.stderr, flush=True)
    raise SystemExit(2)

# ----------------------------------------------------------------------------- config


def rule(default, what, ok):
    """A setting whose values configure checks: ok(value) must hold (None, 'from --model', always does);
    `what` says what is expected: `knn_k: int = rule(20, 'a count >= 1', lambda v: v >= 1)`."""
    return field(default=default, metadata=dict(rule=(what, ok)))


def at_least(lowest, default):  # `batch_size: int = at_least(1, 64)`
    return rule(default, f'>= {lowest}', lambda v: v >= lowest)


def above(lowest, default):
    return rule(default, f'> {lowest}', lambda v: v > lowest)


def one_of(*choices):  # the first is the default: `feature: str = one_of('cls', 'mean')`
    return rule(choices[0], f'one of {", ".join(map(repr, choices))}', lambda v: v in choices)


def betas(default):  # AdamW's (beta1, beta2)
    return rule(default, 'two numbers in [0, 1), as (0.9, 0.999)',
                lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v))


def from_model(cfg):
    """Settings left at None take their value from the architecture --model names in
    beitv2.PRESETS, so that each architecture is defined once; a value given overrides it."""
    kind = type(beitv2.PRESETS[next(f.default for f in fields(cfg) if f.name == 'model')])
    names = [k for k, v in beitv2.PRESETS.items() if isinstance(v, kind)]  # this script's kind of model
    if cfg.model not in names:
        die(f'unknown --model={cfg.model!r} for this stage; choose from {", ".join(names)}')
    arch = asdict(beitv2.PRESETS[cfg.model])
    for f in fields(cfg):
        if getattr(cfg, f.name) is None and f.name in arch:
            setattr(cfg, f.name, arch[f.name])


def model_config(cfg, **fixed):
    """The beitv2 config of --model with this run's settings of the same names, and `fixed`."""
    arch = beitv2.PRESETS[cfg.model]
    own = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in arch.__dataclass_fields__}
    out = type(arch)(**{**asdict(arch), **own, **fixed})
    if out.embed_dim % out.num_heads:
        die(f'--embed_dim={out.embed_dim} is not divisible by --num_heads={out.num_heads}')
    return out


def configure(cfg, presets, argv=None):
    """Apply `--preset=NAME` (a dict of overrides), then every `--key=value` of argv, to the
    dataclass `cfg`; values are parsed as Python literals and must keep the field's type."""
    args = sys.argv[1:] if argv is None else argv
    pairs = []
    for arg in args:
        if not arg.startswith('--') or '=' not in arg:
            die(f'arguments look like --key=value, got {arg!r}')
        pairs.append(arg[2:].split('=', 1))
    preset = dict(pairs).get('preset', cfg.preset)
    if preset not in presets:
        die(f'unknown preset {preset!r}; choose from {", ".join(presets)}')
    names = {f.name: f.type for f in fields(cfg)}
    for key, val in [('preset', preset)] + list(presets[preset].items()) + pairs:
        if key not in names:
            die(f'unknown setting --{key}; settings: {", ".join(names)}')
        kind = names[key]  # the annotated type (a default of None means: from --model)
        if isinstance(val, str) and kind is not str:
            try:
                val = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                die(f'--{key}={val}: not a {kind.__name__}')
        if kind is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if type(val) is not kind:
            die(f'--{key}={val!r}: expected {kind.__name__}')
        setattr(cfg, key, val)
    if hasattr(cfg, 'model'):
        from_model(cfg)
    for f in fields(cfg):  # the ranges and choices written beside the fields (rule, at_least, one_of, ...)
        value = getattr(cfg, f.name)
        if 'rule' in f.metadata and value is not None and not f.metadata['rule'][1](value):
            die(f'--{f.name}={getattr(cfg, f.name)!r}: must be {f.metadata["rule"][0]}')
    return cfg

# ----------------------------------------------------------------------------- distributed / device / dtype


def cpu_has_fast_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX): there a bf16 step takes
    ~0.6x the fp32 time; without it bf16 is emulated, ~5x slower per matmul than fp32 (measured)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:  # not Linux: stay in fp32
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


class Env:
    """Who and where this process is. Under torchrun: DDP (nccl on CUDA, gloo on CPU)."""

    def __init__(self, cfg):
        if cfg.device not in ('', 'cpu') and not re.fullmatch(r'cuda(:\d+)?', cfg.device):
            die(f"--device must be cpu, cuda or cuda:N ('' = cuda when there is one), got {cfg.device!r}")
        if cfg.device.startswith('cuda') and not torch.cuda.is_available():
            die(f'--device={cfg.device}: this machine has no CUDA device (use --device=cpu)')
        self.ddp = 'RANK' in os.environ
        self.rank = int(os.environ.get('RANK', 0))
        self.world = int(os.environ.get('WORLD_SIZE', 1))
        local = int(os.environ.get('LOCAL_RANK', 0))
        cuda = torch.cuda.is_available() and cfg.device != 'cpu'
        self.device = torch.device(f'cuda:{local}' if cuda else 'cpu')
        self.lock = None  # OUT_DIR/lock while this process holds it (claim_out_dir)
        self.inputs = {}  # digests of the files the run starts from (resume sets them; checkpoints keep them)
        self.stage = os.path.basename(sys.modules[type(cfg).__module__].__file__)  # the script: pretrain.py, ...
        if cuda:
            torch.cuda.set_device(self.device)
        if self.ddp:
            dist.init_process_group('nccl' if cuda else 'gloo')
        self.master = self.rank == 0
        dtype = cfg.dtype or ('bf16' if cuda or cpu_has_fast_bf16() else 'fp32')
        if dtype not in ('fp32', 'bf16', 'fp16'):
            die(f'--dtype must be fp32, bf16 or fp16, got {dtype!r}')
        self.dtype = dtype
        self.amp_dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == 'fp16')
        torch.manual_seed(cfg.seed + self.rank)  # per-rank seeds (drop path, k-means draws)
        random.seed(cfg.seed + self.rank)
        if cuda:  # fp32 is fp32 (the codebook, k-means, losses, --dtype=fp32); the tests set the same
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def target_autocast(self):  # pretraining targets: fp16 on CUDA under mixed precision, as the official
        #                           engine (bf16 flips more near-tie codes: docs/speed.md); else the step's dtype
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
        release_lock(self.lock)
        self.lock = None
        if self.ddp:
            dist.destroy_process_group()


def claim_out_dir(cfg, env):
    """Create OUT_DIR and hold OUT_DIR/lock ('pid@host') while this run writes there, so that a
    second run on the same folder stops at start instead of interleaving checkpoints and logs.
    The lock goes at exit; one left by a process that no longer runs (this host) is taken over."""
    if not env.master:
        return
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        die(f'--out_dir={cfg.out_dir}: cannot create it ({e.strerror})')
    if not os.access(cfg.out_dir, os.W_OK | os.X_OK):
        die(f'--out_dir={cfg.out_dir}: not writable')
    lock, me = os.path.join(cfg.out_dir, 'lock'), f'{os.getpid()}@{socket.gethostname()}'
    tmp = f'{lock}.{os.getpid()}'
    with open(tmp, 'w') as f:  # the lock appears whole or not at all: written aside, then linked
        f.write(me)
    try:
        while True:
            try:
                os.link(tmp, lock)  # fails if the lock exists: at most one run gets it
                break
            except FileExistsError:
                with open(lock) as f:
                    owner = f.read().strip()
                pid, _, host = owner.partition('@')
                if owner == me:  # this process again (scripts called as functions, e.g. by the tests)
                    return
                if host and (host != socket.gethostname() or not pid.isdigit() or process_alive(int(pid))):
                    die(f'{cfg.out_dir} is in use by another run (process {owner}): choose another --out_dir, '
                        f'or delete {lock} if no run uses it')
                env.print(f'note: {lock} was left by process {pid or "?"}, which is gone: taking it over')
                os.remove(lock)
    finally:
        os.remove(tmp)
    env.lock = lock
    atexit.register(release_lock, lock)  # also on die() and on errors


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def release_lock(lock):
    me = f'{os.getpid()}@{socket.gethostname()}'
    try:
        with open(lock) as f:
            if f.read().strip() == me:
                os.remove(lock)
    except (OSError, TypeError):  # already gone, or no lock
        pass

# ----------------------------------------------------------------------------- optimizer, schedule


def layer_id(name, depth):
    """Official layer ids for layer-wise lr decay: embeddings 0, block l -> l+1, the rest L+1."""
    m = re.search(r'(?:^|\.)blocks\.(\d+)\.', name)
    if m:
        return int(m.group(1)) + 1
    leaf = name.split('.')[-1]
    if leaf in ('cls_token', 'mask_token', 'pos_embed') or 'patch_embed.' in name:
        return 0
    return depth + 1


def param_groups(model, weight_decay, layer_decay=1.0, depth=None, no_decay=('cls_token', 'pos_embed')):
    """AdamW groups as the official optim_factory: no weight decay for 1-D parameters, biases,
    and the parameters named in no_decay (mask_token and the shared relative position table ARE
    decayed); each group carries lr_scale = layer_decay ** (depth + 1 - layer_id)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split('.')[-1]
        no_wd = p.ndim <= 1 or name.endswith('.bias') or leaf in no_decay
        lid = layer_id(name, depth) if depth is not None else 0
        scale = layer_decay ** (depth + 1 - lid) if depth is not None else 1.0
        g = groups.setdefault((lid, no_wd), dict(params=[], weight_decay=0.0 if no_wd else weight_decay,
                                                 lr_scale=scale))
        g['params'].append(p)
    return list(groups.values())



def get_lr(step, steps, warmup_steps, lr, min_lr, schedule='cosine', epochs=0):
    """Linear warmup from 0, then to min_lr by cosine (official cosine_scheduler); per step.
    'poly': mmcv's PolyLrUpdaterHook, power 1, the official segmentation one: linear decay from step
    0 over all steps, its linear warmup (ratio 1e-6) scaling it. 'cosine_epoch': torch's
    CosineAnnealingLR stepped once per epoch, no warmup (BEiT v1's linear evaluation)."""
    if schedule == 'poly':
        lr = min_lr + (lr - min_lr) * (1 - step / steps)
        return lr * (1 - (1 - step / warmup_steps) * (1 - 1e-6)) if step < warmup_steps else lr
    if schedule == 'cosine_epoch':
        epoch = step * epochs // steps
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if step < warmup_steps:
        return lr * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g['lr'] = lr * g.get('lr_scale', 1.0)  # layer-wise lr decay


def optimizer_step(env, optimizer, clip_grad):
    """Unscale (fp16), clip (0 = no clip; the norm is measured anyway), step, zero the grads."""
    env.scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g['params']]
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip_grad or float('inf'))
    env.scaler.step(optimizer)
    env.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return gnorm.item()


def steps_from_epochs(cfg, env, n_images):
    """Epoch recipes become step counts at start (an optimizer step = batch * accum * world)."""
    per_step = cfg.batch_size * cfg.accum * env.world
    steps_per_epoch = n_images // env.world // cfg.batch_size // cfg.accum
    if steps_per_epoch == 0:
        die(f'{n_images} images are fewer than one step of {per_step}: lower batch_size')
    if cfg.epochs > 0:
        cfg.steps = cfg.epochs * steps_per_epoch
        cfg.warmup_steps = cfg.warmup_epochs * steps_per_epoch
    return steps_per_epoch, per_step


# ----------------------------------------------------------------------------- checkpoints, logging


def block_index(layer, depth):
    """--layer as a block index in [0, depth): -1 is the last block; a block the model lacks ends the run."""
    if not -depth <= layer < depth:
        die(f'--layer={layer}: the model has blocks 0..{depth - 1} (or -1 for the last)')
    return layer % depth


def read_checkpoint(path):
    """beitv2.load_file (no code runs) with a one-line error: a missing, truncated or foreign file, or one
    that would run code, ends the run naming it."""
    if not os.path.isfile(path):
        die(f'{path}: no such file')
    junk = f'{path}: not a readable checkpoint (truncated, or not a PyTorch file)'
    try:
        return beitv2.load_file(path)
    except pickle.UnpicklingError:  # a zip checkpoint names the callables it would call
        try:
            code = ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not a zip checkpoint at all
            die(junk)
        die(f'{path}: refused to load: it would run code ({code}); a checkpoint holds only tensors and plain '
            'containers' if code else junk)
    except Exception:  # whatever torch raises on junk: random bytes can raise almost anything
        die(junk)


def code_usage(counts):
    """counts: (K,) code histogram -> dict(unused codes, usage fraction, perplexity)."""
    p = counts.double() / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item()
    unused = int((counts == 0).sum())
    return dict(unused=unused, usage=1 - unused / counts.numel(), perplexity=perplexity)


def rng_state():
    """This process's RNG states as tensors (so the checkpoint loads with weights_only=True)."""
    py = random.getstate()
    s = dict(torch=torch.get_rng_state(), python=torch.tensor(py[1], dtype=torch.int64))
    if torch.cuda.is_available():
        s['cuda'] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    torch.set_rng_state(s['torch'])
    random.setstate((3, tuple(s['python'].tolist()), None))
    if 'cuda' in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s['cuda'])


def save_checkpoint(path, env, **state):
    """Gather every rank's RNG state; rank 0 writes atomically (temp file + rename)."""
    rngs = [None] * env.world
    if env.ddp:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if env.master:
        tmp = path + '.tmp'
        try:
            torch.save(dict(state, rng=rngs, world=env.world, stage=env.stage, inputs=env.inputs), tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # a full disk reads "unexpected pos" in torch's words
            if os.path.exists(tmp):
                os.remove(tmp)
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
            die(f'could not write {path}: {str(e).splitlines()[0][:120]}; {free:.0f} MiB free on its disk '
                f'(no space left?); the previous checkpoint, if any, is intact')


# how a run is run, not what it computes: these may differ on resume; any other setting that
# differs from the checkpoint's is refused unless named in --allow_change
RUN_ONLY = ('preset', 'out_dir', 'resume', 'allow_change', 'log_every', 'ckpt_every', 'stop_after', 'workers',
            'device', 'compile')


def digest(path):  # the content of an input file, in 16 hex digits (read once per version of the file)
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _digest(path, size, mtime):  # size and mtime: a rewritten file is read again
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()[:16]




def check_same_run(cfg, env, saved, path, run_only=RUN_ONLY, inputs=None):
    """One-line error naming the first setting that differs from the checkpoint's config: a setting's
    value, or the content of an input file (--checkpoint, --tokenizer, ...) it names."""
    now = dict(asdict(cfg), world=env.world)

    allowed = {k.strip() for k in cfg.allow_change.split(',') if k.strip()}
    for key, value in now.items():
        if key in run_only or key in allowed or key not in saved:
            continue
        old = saved[key]
        if isinstance(value, tuple) and isinstance(old, (list, tuple)):
            old = tuple(old)
        if old != value:
            name = 'ranks (world size)' if key == 'world' else f'--{key}'
            die(f'{name} is {value!r} but {path} was written with {old!r}: resume with the same setting, start '
                f'a new --out_dir, or pass --allow_change={key} if the change is intended (e.g. more --steps)')
    for key, old in (inputs or {}).items():
        if key in env.inputs and env.inputs[key] != old and key not in allowed:
            die(f'--{key}={getattr(cfg, key)} holds other weights than when {path} was written (its content '
                f'changed): start a new --out_dir, or pass --allow_change={key} to go on with the new file')


def resume(cfg, env, model, optimizer, run_only=RUN_ONLY, inputs=()):
    """Continue from --resume=PATH, or from OUT_DIR/ckpt.pt when it exists. -> (start step, the
    checkpoint's `loop` entry: what a training loop saved of its own, e.g. its best score; {} if none).
    inputs: the settings naming files the run starts from; their content must be the checkpoint's too."""
    path = cfg.resume or os.path.join(cfg.out_dir, 'ckpt.pt')
    env.inputs = {k: digest(getattr(cfg, k)) for k in inputs if os.path.isfile(getattr(cfg, k))}
    if not os.path.exists(path):
        if cfg.resume:
            die(f'--resume: {path} does not exist')
        return 0, {}
    ckpt = read_checkpoint(path)
    if ckpt.get('stage', env.stage) != env.stage:
        die(f'{path} was written by {ckpt["stage"]}, not {env.stage}: pass one of its own checkpoints, or another '
            '--out_dir')
    try:
        if isinstance(ckpt.get('config'), dict):
            saved = dict(ckpt['config'], world=ckpt.get('world', env.world))
            check_same_run(cfg, env, saved, path, run_only, ckpt.get('inputs'))
        beitv2.load_state(model, ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        die(f'cannot resume from {path}: {e}')
    env.scaler.load_state_dict(ckpt['scaler'])
    if ckpt['world'] == env.world:
        set_rng_state(ckpt['rng'][env.rank])
    else:
        env.print(f'note: checkpoint written by {ckpt["world"]} ranks, now {env.world}: RNG not restored')
    env.print(f'resumed from {path} at step {ckpt["step"]}')
    if ckpt['step'] >= cfg.steps:
        env.print(f'note: this run was already complete ({ckpt["step"]} of {cfg.steps} steps): nothing to train. '
                  f'To train again, start a new --out_dir; to train longer, pass more --steps with '
                  f'--allow_change=steps')
    return ckpt['step'], ckpt.get('loop', {})


class Logger:
    """Rank 0: one fixed-format line per log step, and the same numbers in OUT_DIR/log.jsonl."""

    def __init__(self, cfg, env, start_step):
        self.env, self.path = env, os.path.join(cfg.out_dir, 'log.jsonl')
        self.start, self.t_start = start_step, time.time()
        self.t0 = self.t_start
        if env.master and os.path.exists(self.path):  # a resumed run: drop the lines after its checkpoint
            rows = read_log(self.path, env.print)
            with open(self.path, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows if r.get('step', 0) <= start_step)

    def __call__(self, step, total, images_per_step, **metrics):
        if not self.env.master:
            return
        now = time.time()
        elapsed, done = now - self.t_start, max(1, step - self.start)  # since this run started
        metrics.update(img_per_s=done * images_per_step / elapsed, eta_min=(total - step) * elapsed / done / 60,
                       step=step, time=round(now - self.t0, 3))
        self.t0 = now
        self.write(f'step {step}/{total}', metrics)

    def scores(self, step, **metrics):  # an evaluation during training: one line, and in log.jsonl
        if self.env.master:
            self.write(f'step {step}', dict(metrics, step=step))

    def write(self, head, metrics):  # a line of log.jsonl, and the same numbers printed
        with open(self.path, 'a') as f:
            f.write(json.dumps(metrics) + '\n')
        shown = ' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                           for k, v in metrics.items() if k not in ('step', 'time'))
        print(f'{head} | {shown}', flush=True)


def read_log(path, note=print):
    """The rows of a log.jsonl; a line cut short (a full disk, a kill while writing) is dropped with a note."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.strip():
                    note(f'note: {path} line {i} is cut short: dropped')
    return rows


def check_finite(loss, step, cfg):
    """Stop at a non-finite loss, saying what the last checkpoint holds: it may have diverged already."""
    if math.isfinite(loss):
        return
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        die(f'loss is {loss} at step {step}: stopping; no checkpoint was written yet (lower --lr?)')
    ckpt = read_checkpoint(path)
    w = max(v.abs().max().item() for v in ckpt['model'].values() if v.is_floating_point() and v.numel())
    held = 'non-finite weights' if not math.isfinite(w) else f'weights up to |w| = {w:.3g}'
    die(f'loss is {loss} at step {step}: stopping; the last checkpoint, {path} (step {ckpt["step"]}), holds '
        f'{held} (lower --lr?)')


def print_setup(cfg, env, steps_per_epoch, per_step):
    env.print(json.dumps(asdict(cfg)))
    env.print(f'{env.world} rank(s) on {env.device}, {env.dtype}; effective batch {per_step} '
              f'({cfg.batch_size} x {cfg.accum} accum x {env.world}); {steps_per_epoch} steps/epoch; '
              f'{cfg.steps} steps, {cfg.warmup_steps} warmup; peak lr {cfg.lr:.3g}')
    if cfg.recipe_batch and cfg.recipe_batch != per_step:  # presets are per rank: the world size changes the batch
        accum = cfg.recipe_batch / (cfg.batch_size * env.world)
        fix = f'--accum={accum:.0f}' if accum == round(accum) else f'batch_size x accum x ranks = {cfg.recipe_batch}'
        env.print(f'note: the recipe runs {cfg.recipe_batch} images per step, this run {per_step}: {fix} matches it')
