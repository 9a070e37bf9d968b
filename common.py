"""What the three stage scripts share: `--key=value` settings with their ranges and choices, the process's place (DDP,
device, dtype), the OUT_DIR lock, optimizer groups and the lr schedule, checkpoints (safe reading, atomic writing, exact
resume) and logging. Model code is in beitv2.py, data in data.py."""
import ast
import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import math
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import beitv2
import data


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


def within(default, lo, hi, top=']'):  # `reprob: float = within(0.25, 0, 1)`; top=')': below hi
    return rule(default, f'in [{lo}, {hi}{top}', lambda v: lo <= v <= hi and (top == ']' or v < hi))


def one_of(*choices):  # the first is the default: `feature: str = one_of('cls', 'mean')`
    return rule(choices[0], f'one of {", ".join(map(repr, choices))}', lambda v: v in choices)


def betas(default):  # AdamW's (beta1, beta2)
    return rule(default, 'two numbers in [0, 1), e.g. --betas=0.9,0.98',
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
    if not getattr(out, 'early_layers', 1) <= out.depth:
        die(f'--early_layers={out.early_layers}: the model has {out.depth} blocks')
    return out


def configure(cfg, presets, argv=None):
    """Apply `--preset=NAME` (a dict of overrides), then every `--key=value` of argv, to the dataclass `cfg`; values are
    parsed as Python literals and must keep the field's type. The command line wins over the preset: cfg.given names its
    settings (steps given there are not recomputed from a preset's epochs, for example)."""
    args = sys.argv[1:] if argv is None else argv
    if {'-h', '--help'} & set(args):
        print(settings_help(cfg, presets))
        raise SystemExit(0)
    for arg in args:
        if not arg.startswith('--') or '=' not in arg:
            die(f'arguments look like --key=value, got {arg!r}')
    pairs = [arg[2:].split('=', 1) for arg in args]
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
            except (ValueError, SyntaxError):  # bare words: a tuple of them (--backbones=checkpoint,random)
                val = tuple(val.split(',')) if kind is tuple else die(f'--{key}={val}: not a {kind.__name__}')
        if kind is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if type(val) is not kind:
            die(f'--{key}={val!r}: expected {kind.__name__}')
        setattr(cfg, key, os.path.expanduser(val) if kind is str else val)  # ~/x: a path under the home folder
    cfg.given = {key for key, _ in pairs}
    if hasattr(cfg, 'model'):
        from_model(cfg)
    for f in fields(cfg):  # the ranges and choices written beside the fields (rule, at_least, one_of, ...)
        value = getattr(cfg, f.name)
        if 'rule' in f.metadata and value is not None and not f.metadata['rule'][1](value):
            die(f'--{f.name}={value!r}: must be {f.metadata["rule"][0]}')
    return cfg


def settings_help(cfg, presets):
    """--help: the script's docstring, then each setting with its default, its range or choices, and the comment
    beside its declaration (read from the source: the help lives where the setting is declared)."""
    notes = {k: a + re.sub(r'\n    # +', ' ', b) for c in reversed(type(cfg).__mro__[:-1])  # a script's own wins
             for k, a, b in re.findall(r'^    (\w+): .*?  # (.*)((?:\n    #  {9,}.*)*)', inspect.getsource(c), re.M)}
    rows = [f'  --{f.name}={f.default!r} '.ljust(34) + '  '.join(filter(None, [
        f'({f.metadata["rule"][0]})' if 'rule' in f.metadata else '', notes.get(f.name)])) for f in fields(cfg)]
    doc = sys.modules[type(cfg).__module__].__doc__.strip()
    return '\n'.join([doc, '', f'presets: {", ".join(presets)}', 'settings (--key=value; None: from --model):'] + rows)


@dataclass
class Run:
    """The settings every stage shares: what it trains on, how long, how, where. Each script's Config
    adds its own and may change a default here."""
    preset: str = 'demo'            # a named set of settings (the official recipes); the ones given here win
    data: str = rule('demo', 'not empty', bool)  # demo, demo:N, an ImageNet folder (ROOT/train, ROOT/val), cifar10:ROOT
    workers: int = at_least(0, 2)   # DataLoader processes per rank
    batch_size: int = at_least(1, 64)  # per rank; effective = batch_size * accum * world
    accum: int = at_least(1, 1)     # gradient accumulation steps
    recipe_batch: int = at_least(0, 0)  # presets: the official images per step; a run with other says the --accum
    epochs: int = at_least(0, 0)    # > 0: steps and warmup_steps come from epochs (unless given)
    warmup_epochs: int = at_least(0, 0)  # the warmup in epochs, with --epochs
    steps: int = at_least(1, 500)   # optimizer steps in all (a resumed run counts the ones done)
    warmup_steps: int = at_least(0, 50)  # linear warmup of the lr from 0
    lr: float = above(0, 1.5e-3)    # peak lr
    min_lr: float = at_least(0, 1e-5)  # the lr at the last step
    schedule: str = one_of('cosine', 'poly', 'cosine_epoch')  # per step | linear decay (the official
    #                                 segmentation one) | per epoch, no warmup (BEiT v1 linear; needs --epochs)
    weight_decay: float = at_least(0, 0.05)  # AdamW's (not on biases, norms, [CLS] and position embeddings)
    betas: tuple = betas((0.9, 0.999))  # AdamW's
    clip_grad: float = at_least(0, 0.0)  # gradient norm clipping; 0 = none
    device: str = ''                # '' = cuda if available; 'cpu' forces the CPU
    dtype: str = one_of('', 'fp32', 'bf16', 'fp16')  # '' = bf16 on CUDA and on CPUs with bf16 units
    compile: bool = False           # torch.compile the model
    seed: int = within(0, 0, 2 ** 32, ')')  # the run's randomness: init, crops, masks, sampling order
    out_dir: str = ''               # where checkpoints and log.jsonl go
    resume: str = ''                # checkpoint to continue from; default OUT_DIR/ckpt.pt if present
    allow_change: str = ''          # resume: settings that may differ from the checkpoint's, e.g. steps,lr
    log_every: int = at_least(1, 25)  # a log line every N steps
    ckpt_every: int = at_least(1, 250)  # OUT_DIR/ckpt.pt every N steps (and at the end)
    stop_after: int = at_least(0, 0)  # > 0: checkpoint and exit after this many steps of this run

# ----------------------------------------------------------------------------- distributed / device / dtype


def cpu_has_fast_bf16():  # AVX-512 BF16 or AMX (Linux): a bf16 step ~0.6x fp32; elsewhere bf16 is emulated, ~5x slower
    cpuinfo = pathlib.Path('/proc/cpuinfo')
    return cpuinfo.exists() and bool(re.search(r'avx512_bf16|amx_bf16', cpuinfo.read_text()))


class Env:
    """Who and where this process is. Under torchrun: DDP (nccl on CUDA, gloo on CPU). Holds OUT_DIR."""

    def __init__(self, cfg):
        cuda = torch.cuda.is_available() and cfg.device != 'cpu'
        if not re.fullmatch(r'(cpu|cuda(:\d+)?)?', cfg.device) or cfg.device[:4] == 'cuda' and not cuda:
            die(f"--device={cfg.device!r}: must be cpu, or cuda / cuda:N where the machine has CUDA ('' = cuda if any)")
        self.ddp, self.world = 'RANK' in os.environ, int(os.getenv('WORLD_SIZE', 1))
        self.rank = int(os.getenv('RANK', 0))
        self.device = torch.device(f'cuda:{os.environ.get("LOCAL_RANK", 0)}' if cuda else 'cpu')
        self.lock = None  # OUT_DIR/lock while this process holds it (claim_out_dir)
        self.inputs = {}  # digests of the files the run starts from (resume sets them; checkpoints keep them)
        self.stage = os.path.basename(sys.modules[type(cfg).__module__].__file__)  # the script: pretrain.py, ...
        if cuda:
            torch.cuda.set_device(self.device)
        if self.ddp:
            dist.init_process_group('nccl' if cuda else 'gloo')
        self.master = self.rank == 0
        self.dtype = getattr(cfg, 'dtype', 'fp32') or ('bf16' if cuda or cpu_has_fast_bf16() else 'fp32')
        self.amp_dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[self.dtype]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == 'fp16')
        torch.manual_seed(getattr(cfg, 'seed', 0) + self.rank)  # per-rank seeds (drop path, k-means draws)
        random.seed(getattr(cfg, 'seed', 0) + self.rank)
        if cuda:  # fp32 is fp32 (the codebook, k-means, losses, --dtype=fp32); the tests set the same
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if getattr(cfg, 'out_dir', ''):
            claim_out_dir(cfg, self)
        signal.signal(signal.SIGINT, functools.partial(on_interrupt, os.getpid()))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def target_autocast(self):  # pretraining targets: fp16 on CUDA under mixed precision, as the official
        #                           engine (bf16 flips more near-tie codes: docs/speed.md); else the step's dtype
        cuda = self.device.type == 'cuda' and self.amp_dtype is not None
        return torch.autocast('cuda', dtype=torch.float16) if cuda else self.autocast()

    def print(self, *a):
        if self.master:
            print(*a, flush=True)

    def all_reduce(self, t):
        if self.ddp:
            dist.all_reduce(t)
        return t

    def close(self):
        if self.lock in HELD:  # another run may have the folder now
            HELD.pop(self.lock).close()
        if self.ddp:
            dist.destroy_process_group()


HELD = {}  # the OUT_DIR/lock files this process holds open, locked
PENDING = []  # [False] while fit may end its step on Ctrl-C; [True] once Ctrl-C came


def on_interrupt(pid, *_):
    """Ctrl-C (SIGINT): one line, no traceback. While fit trains on one process, the step under way ends and is
    saved first; elsewhere, and under DDP (agreeing on a step would take a collective each step), it ends at once."""
    if os.getpid() != pid:  # a DataLoader worker serves on: the main process ends it
        return
    if PENDING != [False]:
        die('interrupted: stopped; the last checkpoint written, if any, stands')
    PENDING[0] = True


def claim_out_dir(cfg, env):
    """Create OUT_DIR and hold an exclusive lock on OUT_DIR/lock ('pid@host' inside) while this run writes there,
    so that a second run on the same folder stops at start instead of interleaving checkpoints and logs. The
    system drops the lock when the process ends, however it ends: no lock is ever left behind."""
    if not env.master:
        return
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        path = os.path.realpath(os.path.join(cfg.out_dir, 'lock'))
        f = HELD.get(path) or open(path, 'a+')  # held already: this process again (scripts called as functions)
    except OSError as e:
        die(f'--out_dir={cfg.out_dir}: cannot create it ({e.strerror})')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        die(f'{cfg.out_dir} is in use by another run (process {f.read().strip() or "?"}): choose another --out_dir')
    f.truncate(0)
    f.write(f'{os.getpid()}@{socket.gethostname()}')
    f.flush()
    HELD[path] = f
    env.lock = path


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


def optimizer_step(env, optimizer, clip_grad):
    """Unscale (fp16), clip (0 = no clip; the norm is measured anyway), step, zero the grads. -> the gradient
    norm, a tensor (reading it would wait for the device)."""
    env.scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']],
                                           clip_grad or float('inf'))
    env.scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
    env.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return gnorm


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


def read_tokenizer(path, device):  # a frozen tokenizer (ours or an official vqkd_*.pth) there, or one line
    try:
        return beitv2.load_tokenizer(read_checkpoint(path)).to(device)
    except (ValueError, KeyError) as e:
        die(f'tokenizer {path}: {e}')


def code_usage(counts):
    """counts: (K,) code histogram -> dict(unused codes, perplexity)."""
    p = counts.double() / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item()
    return dict(unused=int((counts == 0).sum()), perplexity=perplexity)


def rng_state():  # this process's RNG states as tensors (so the checkpoint loads with weights_only=True)
    s = dict(torch=torch.get_rng_state(), python=torch.tensor(random.getstate()[1], dtype=torch.int64))
    return dict(s, cuda=torch.cuda.get_rng_state()) if torch.cuda.is_available() else s


def set_rng_state(s):
    torch.set_rng_state(s['torch'])
    random.setstate((3, tuple(s['python'].tolist()), None))
    if 'cuda' in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s['cuda'])


def save_checkpoint(path, env, **state):
    """Gather every rank's RNG state; rank 0 writes atomically (temp file + rename)."""
    rngs = [rng_state()] * env.world  # every rank's, under DDP
    if env.ddp:
        dist.all_gather_object(rngs, rngs[0])
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
RUN_ONLY = ('preset', 'out_dir', 'resume', 'allow_change', 'log_every', 'ckpt_every', 'eval_every', 'stop_after',
            'workers', 'device', 'compile')


def digest(path):  # the content of an input file, in 16 hex digits
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()[:16]


def check_same_run(cfg, env, saved, path, inputs=None):
    """One-line error naming the first setting that differs from the checkpoint's config: a setting's
    value, or the content of an input file (--checkpoint, --tokenizer, ...) it names."""
    now = dict(asdict(cfg), world=env.world)
    allowed = {k.strip() for k in cfg.allow_change.split(',') if k.strip()}
    for key, value in now.items():
        if key in RUN_ONLY or key in allowed or key not in saved:
            continue
        old = tuple(saved[key]) if isinstance(value, tuple) and isinstance(saved[key], list) else saved[key]
        if old != value:
            name = 'ranks (world size)' if key == 'world' else f'--{key}'
            die(f'{name} is {value!r} but {path} was written with {old!r}: resume with the same setting, start '
                f'a new --out_dir, or pass --allow_change={key} if the change is intended (e.g. more --steps)')
    for key, old in (inputs or {}).items():
        if key in env.inputs and env.inputs[key] != old and key not in allowed:
            die(f'--{key}={getattr(cfg, key)} holds other weights than when {path} was written (its content '
                f'changed): start a new --out_dir, or pass --allow_change={key} to go on with the new file')


def resume(cfg, env, model, optimizer, inputs=()):
    """Continue from --resume=PATH, or from OUT_DIR/ckpt.pt when it exists. -> (start step, the
    checkpoint's `loop` entry: what a training loop saved of its own, e.g. its best score; {} if none).
    inputs: the settings naming files the run starts from; their content must be the checkpoint's too."""
    path = cfg.resume or os.path.join(cfg.out_dir, 'ckpt.pt')
    env.inputs = {k: digest(getattr(cfg, k)) for k in inputs if os.path.isfile(getattr(cfg, k))}
    if not os.path.exists(path):
        return (0, {}) if not cfg.resume else die(f'--resume: {path} does not exist')
    ckpt = read_checkpoint(path)
    if ckpt.get('stage', env.stage) != env.stage:
        die(f'{path} was written by {ckpt["stage"]}, not {env.stage}: pass one of its own checkpoints, or another '
            '--out_dir')
    try:
        if isinstance(ckpt.get('config'), dict):
            saved = dict(ckpt['config'], world=ckpt.get('world', env.world))
            check_same_run(cfg, env, saved, path, ckpt.get('inputs'))
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
        env.print(f'note: this run was already complete ({ckpt["step"]} of {cfg.steps} steps): nothing to train. To '
                  'train again, start a new --out_dir; to train longer, pass more --steps with --allow_change=steps')
    return ckpt['step'], ckpt.get('loop', {})


class Logger:
    """Rank 0: one line per log step (a training line adds images/s and the minutes left, since this run
    started), and the same numbers in OUT_DIR/log.jsonl."""

    def __init__(self, cfg, env, start_step):
        self.env, self.path, self.start, self.t0 = env, os.path.join(cfg.out_dir, 'log.jsonl'), start_step, time.time()
        if env.master and os.path.exists(self.path):  # a resumed run: drop the lines after its checkpoint
            rows = read_log(self.path, env.print)
            with open(self.path, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows if r.get('step', 0) <= start_step)

    def __call__(self, step, metrics, total=0, images_per_step=0):
        if not self.env.master:
            return
        if total:
            elapsed, done = time.time() - self.t0, max(1, step - self.start)
            metrics = dict(metrics, img_per_s=done * images_per_step / elapsed,
                           eta_min=(total - step) * elapsed / done / 60)
        with open(self.path, 'a') as f:
            f.write(json.dumps(dict(metrics, step=step)) + '\n')
        shown = ' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items())
        print(f'step {step}{f"/{total}" if total else ""} | {shown}', flush=True)


PROGRESS_EVERY = 10.0  # seconds


def progress(env, what, total):
    """-> tick(i): 'WHAT: i/total, about N s left' at most every PROGRESS_EVERY s (rank 0): a long phase lives."""
    t0 = last = time.time()

    def tick(i):
        nonlocal last
        if time.time() - last >= PROGRESS_EVERY and i < total:
            last = time.time()
            env.print(f'{what}: {i}/{total}, about {(last - t0) / i * (total - i):.0f} s left')
    return tick


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


# ----------------------------------------------------------------------------- the training loop


def fit(cfg, env, model, optimizer, dataset, transform, step_fn, score=None, metric='', higher=True, lr=None,
        inputs=(), model_config=None, sync_buffers=True, joint=False, at_log=None, quiet=False):
    """The training loop of every stage (tokenizer, pretraining, the trained evaluation modes), as MAE's engine: the
    per-step lr, accumulation (no_sync), autocast and the loss scaler, clipping, logging, evaluation every --eval_every
    steps and at the end, atomic checkpoints and bit-exact resume. step_fn(run, batch) -> (loss, stats): one micro-
    batch's loss and a dict of tensors for the log line; at_log() -> more numbers for it (e.g. the codes used since the
    last one). score(model) -> dict of scores (None: no val split); the best `metric` is kept, its weights in
    OUT_DIR/best.pt when scored periodically. lr: the peak lr (default cfg.lr). quiet: a name: progress only, no resume
    (compare's probes). The host reads the device only at log, evaluation and checkpoint steps: finiteness is gathered
    on the device and checked there, so a NaN never overwrites a good checkpoint. -> the final scores, best_METRIC and
    best_step; dict(step) without score; None when --stop_after ended it."""
    lr = lr or cfg.lr
    per_step = cfg.batch_size * cfg.accum * env.world  # images per optimizer step
    steps_per_epoch = len(dataset) // per_step
    if steps_per_epoch == 0:
        die(f'{len(dataset)} images are fewer than one step of {per_step}: lower batch_size')
    for key, epochs in (('steps', cfg.epochs), ('warmup_steps', cfg.warmup_epochs)):
        if cfg.epochs and key not in getattr(cfg, 'given', ()):
            setattr(cfg, key, epochs * steps_per_epoch)
        elif cfg.epochs and not quiet:
            env.print(f'note: --{key}={getattr(cfg, key)} replaces the preset\'s {epochs} epochs '
                      f'({epochs * steps_per_epoch} steps)')
    if not quiet:
        print_setup(cfg, env, steps_per_epoch, per_step, lr)
    every = getattr(cfg, 'eval_every', 0)
    every = (every if every >= 0 else steps_per_epoch if cfg.epochs else 0) if score else 0
    step, kept = (0, {}) if quiet else resume(cfg, env, model, optimizer, inputs)
    best, final, start, t0 = kept.get('best'), None, step, time.time()  # best: what a resumed run had seen
    ddp = DDP(model, forward_sync_buffers=sync_buffers) if env.ddp else model
    run = torch.compile(ddp) if cfg.compile else ddp
    loader, sampler = data.make_loader(dataset, transform, cfg.batch_size, cfg.workers, cfg.seed, env, joint)
    batches = data.stream(loader, sampler, step, steps_per_epoch, cfg.accum)
    log = Logger(cfg, env, step)
    tick = progress(env, f'  {quiet} steps', cfg.steps) if quiet else lambda i: None  # quiet: no log lines, this
    bad = torch.zeros((), dtype=torch.long, device=env.device)  # the first step with a non-finite loss or gradient
    PENDING[:] = [] if env.ddp else [False]  # Ctrl-C: this step ends and is saved (on_interrupt)

    def save(name, **state):
        save_checkpoint(os.path.join(cfg.out_dir, name), env, model=model.state_dict(), step=step,
                        config=asdict(cfg), model_config=model_config, **state)
    while step < cfg.steps:
        lr_now = get_lr(step, cfg.steps, cfg.warmup_steps, lr, cfg.min_lr, cfg.schedule, cfg.epochs)
        for g in optimizer.param_groups:
            g['lr'] = lr_now * g.get('lr_scale', 1.0)  # layer-wise lr decay
        model.train()
        for micro in range(cfg.accum):
            with (ddp.no_sync() if env.ddp and micro < cfg.accum - 1 else contextlib.nullcontext()), env.autocast():
                loss, stats = step_fn(run, next(batches))
                env.scaler.scale(loss / cfg.accum).backward()
        gnorm = optimizer_step(env, optimizer, cfg.clip_grad)
        step += 1
        ok = loss.isfinite() & (gnorm.isfinite() | env.scaler.is_enabled())
        bad = torch.where((bad == 0) & ~ok, step, bad)
        stop = cfg.stop_after and step - start >= cfg.stop_after or PENDING == [True]
        logs, evals = step % cfg.log_every == 0 or step == cfg.steps, every and step % every == 0 or step == cfg.steps
        ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps or stop
        if logs or evals and score or ckpt:
            check_finite(bad, model if ckpt else None, cfg)
        tick(step)
        if logs and not quiet:
            numbers = torch.stack([loss.detach().float(), *(v.detach().float() for v in stats.values()),
                                   gnorm.float()]).tolist()
            log(step, dict(loss=numbers[0], **dict(zip(stats, numbers[1:-1])), **(at_log() if at_log else {}),
                           lr=lr_now, gnorm=numbers[-1]), cfg.steps, per_step)
        if evals and score:
            final = scores = score(model)
            if not quiet:
                log(step, {f'val_{k}': v for k, v in scores.items()})
            if best is None or (scores[metric] > best[metric] if higher else scores[metric] < best[metric]):
                best = dict(scores, step=step)
                if every:  # official checkpoint-best: the weights of the best evaluation
                    save('best.pt', scores=scores)
        if ckpt:
            save('ckpt.pt', optimizer=optimizer.state_dict(), scaler=env.scaler.state_dict(), loop=dict(best=best))
        if PENDING == [True]:
            env.print(f'interrupted at step {step}: {cfg.out_dir}/ckpt.pt holds it; the same command resumes')
            raise SystemExit(130)
        if stop and step < cfg.steps:
            break
    PENDING.clear()  # Ctrl-C after the loop: one line at once (on_interrupt)
    if step < cfg.steps:  # --stop_after ended it
        return None
    if not quiet:
        env.print(f'done: {step} steps ({step - start} in this run, {time.time() - t0:.0f} s); {cfg.out_dir}/ckpt.pt')
    if not score:  # no val split: the run is its checkpoint
        return dict(step=step)
    if final is None:  # a finished run, resumed
        final = score(model)
        best = best or dict(final, step=step)
    return dict(final, **{f'best_{metric}': best[metric], 'best_step': best['step']})


def check_finite(bad, model, cfg):
    """Stop at the first non-finite loss or gradient norm (or, before a checkpoint, weights), saying what the
    last checkpoint holds: it may have diverged already."""
    step = bad.item()
    if not step and model is not None and not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        step = 'this one'
    if not step:
        return
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        die(f'non-finite loss at step {step}: stopping; no checkpoint was written yet (lower --lr?)')
    ckpt = read_checkpoint(path)
    w = max(v.abs().max().item() for v in ckpt['model'].values() if v.is_floating_point() and v.numel())
    held = 'non-finite weights' if not math.isfinite(w) else f'weights up to |w| = {w:.3g}'
    die(f'non-finite loss at step {step}: stopping; the last checkpoint, {path} (step {ckpt["step"]}), holds '
        f'{held} (lower --lr?)')


def print_setup(cfg, env, steps_per_epoch, per_step, lr):
    env.print(json.dumps(asdict(cfg)))
    env.print(f'{env.world} rank(s) on {env.device}, {env.dtype}; effective batch {per_step} '
              f'({cfg.batch_size} x {cfg.accum} accum x {env.world}); {steps_per_epoch} steps/epoch; '
              f'{cfg.steps} steps, {cfg.warmup_steps} warmup; peak lr {lr:.3g}')
    if cfg.recipe_batch and cfg.recipe_batch != per_step:  # presets are per rank: the world size changes the batch
        accum = cfg.recipe_batch / (cfg.batch_size * env.world)
        fix = f'--accum={accum:.0f}' if accum == round(accum) else f'batch_size x accum x ranks = {cfg.recipe_batch}'
        env.print(f'note: the recipe runs {cfg.recipe_batch} images per step, this run {per_step}: {fix} matches it')
