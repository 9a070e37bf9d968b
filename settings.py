"""The settings of a run. Each script declares its own in a dataclass, `Config`, one field each: its
default, its range or choices (at_least, within, one_of, ...) and, in a comment beside it or right
above it, its help.
A `--preset=NAME` (a dict of settings: the official recipes) is applied first, then every
`--key=value` of the command line, which wins. `Run` holds the settings every training stage shares.
`die` ends a run on bad input in one line."""
import ast
import functools
import inspect
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import beitv2


def die(msg):
    """Bad input: one clear line on stderr and exit code 2, instead of a traceback."""
    print(f'error: {msg}', file=sys.stderr, flush=True)
    raise SystemExit(2)


class BadInput(Exception):
    """Bad input found where die() cannot end the run: in a DataLoader worker (an unreadable image,
    a bad mask). The script's main (one_line_errors) ends the run with its message in one line."""


def one_line_errors(main):
    """Wraps a script's main: a BadInput, raised in this process or in a DataLoader worker, ends the
    run as die() does. From a worker it arrives as the worker's traceback, the message on its last
    line."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except BadInput as e:
            die(str(e).strip().splitlines()[-1].split('BadInput: ')[-1])
    return run

# ---------------------------------------------------------- ranges and choices


def rule(default, what, ok):
    """A setting whose value must pass ok(value) (None, a value derived later, always passes);
    `what` says what is expected, in the error and in --help."""
    return field(default=default, metadata=dict(rule=(what, ok)))


def at_least(lowest, default):
    return rule(default, f'>= {lowest}', lambda v: v >= lowest)


def above(lowest, default):
    return rule(default, f'> {lowest}', lambda v: v > lowest)


def within(default, lo, hi):
    return rule(default, f'in [{lo}, {hi}]', lambda v: lo <= v <= hi)


def half_open(default, lo, hi):
    return rule(default, f'in [{lo}, {hi})', lambda v: lo <= v < hi)


def one_of(*choices):
    """The first choice is the default."""
    return rule(choices[0], f'one of {", ".join(map(repr, choices))}', lambda v: v in choices)


def input_file(default):
    """A file the run starts from (a checkpoint, a tokenizer, a teacher's weights): a resumed run
    checks that its content is the one the checkpoint was trained from."""
    return field(default=default, metadata=dict(input=True))


def two_betas(v):
    return len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v)

# --------------------------------------------- the settings every stage shares


@dataclass
class Run:
    # a named set of settings (an official recipe); a setting given on the command line wins over it
    preset: str = 'demo'
    # demo, demo:N (N images), an image folder, or NAME:ROOT for cifar10, cifar100, stl10,
    # fashion_mnist. A folder: ImageNet's layout (ROOT/train/CLASS/image, ROOT/val/...), or, for the
    # stages that need no labels, any folder of images
    data: str = rule('demo', 'not empty', bool)
    workers: int = at_least(0, 2)  # DataLoader processes per rank
    # images per rank and micro-step; the effective batch is batch_size x accum x ranks
    batch_size: int = at_least(1, 64)
    accum: int = at_least(1, 1)  # micro-steps per optimizer step (gradient accumulation)
    # the official effective batch of a preset; a run with another says which --accum matches it
    recipe_batch: int = at_least(0, 0)
    # the length of an epoch recipe: it sets the steps left at None (--steps, --warmup_steps)
    epochs: int = at_least(0, 0)
    warmup_epochs: int = at_least(0, 0)  # the warmup of an epoch recipe
    # optimizer steps in all (a resumed run counts the ones done); None: --epochs of them
    steps: int = at_least(1, 500)
    # linear warmup of the lr from 0; None: --warmup_epochs of them
    warmup_steps: int = at_least(0, 50)
    lr: float = above(0, 1.5e-3)  # peak lr
    min_lr: float = at_least(0, 1e-5)  # the lr at the last step
    # cosine: per step after the warmup | poly: linear decay (the official segmentation one) |
    # cosine_epoch: per epoch, no warmup (BEiT v1's linear probe; needs --epochs)
    schedule: str = one_of('cosine', 'poly', 'cosine_epoch')
    # AdamW's, not on biases, norms, [CLS] and position embeddings
    weight_decay: float = at_least(0, 0.05)
    # AdamW's
    betas: tuple = rule((0.9, 0.999), 'two numbers in [0, 1), e.g. --betas=0.9,0.98', two_betas)
    clip_grad: float = at_least(0, 0.0)  # gradient norm clipping; 0 = none
    device: str = ''  # '' = cuda if there is one; cpu forces the CPU
    # autocast; '' = bf16 on CUDA and on CPUs with bf16 units, else fp32
    dtype: str = one_of('', 'fp32', 'bf16', 'fp16')
    # torch.compile the model: faster steps on a GPU; on a CPU the first step compiles for minutes,
    # and the demo's steps are no faster (docs/speed.md)
    compile: bool = False
    seed: int = half_open(0, 0, 2 ** 32)  # the run's randomness: init, crops, masks, sampling order
    out_dir: str = ''  # where checkpoints and log.jsonl go
    resume: str = ''  # a checkpoint to continue from; by default OUT_DIR/ckpt.pt when there is one
    # on resume, settings that may differ from the checkpoint's, e.g. steps,lr
    allow_change: str = ''
    log_every: int = at_least(1, 25)  # a log line every N steps
    ckpt_every: int = at_least(1, 250)  # OUT_DIR/ckpt.pt every N steps, and at the end
    # > 0: checkpoint and stop after this many steps of this run (a time slice)
    stop_after: int = at_least(0, 0)

# ----------------------------------------------------------------- --key=value


def configure(cfg, presets, argv=None):
    """cfg with --preset's settings applied, then every --key=value of argv (default: the command
    line); the settings left at None that --model defines are taken from it; then every range and
    choice is checked. --help prints the settings and exits."""
    args = sys.argv[1:] if argv is None else argv
    if '-h' in args or '--help' in args:
        print(help_text(cfg, presets))
        raise SystemExit(0)
    given = []
    for arg in args:
        if not arg.startswith('--') or '=' not in arg:
            die(f'arguments look like --key=value, got {arg!r}')
        given.append(arg[2:].split('=', 1))
    preset = dict(given).get('preset', cfg.preset)
    if preset not in presets:
        die(f'unknown preset {preset!r}; choose from {", ".join(presets)}')
    kinds = {f.name: f.type for f in fields(cfg)}
    for key, value in [('preset', preset), *presets[preset].items(), *given]:
        if key not in kinds:
            die(f'unknown setting --{key}; settings: {", ".join(kinds)}')
        setattr(cfg, key, parse(key, value, kinds[key]))
    if 'model' in kinds:
        from_model(cfg)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if 'rule' in f.metadata and value is not None and not f.metadata['rule'][1](value):
            die(f'--{f.name}={value!r}: must be {f.metadata["rule"][0]}')
    return cfg


def parse(key, value, kind):
    """A value of the command line (a string) as the field's type: a Python literal (3, 0.1, (0.9,
    0.98), True, None), or bare words for a tuple (checkpoint,random). A path may start with ~ (the
    home folder)."""
    if isinstance(value, str) and kind is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if kind is not tuple:
                die(f'--{key}={value}: not a {kind.__name__}')
            value = tuple(value.split(','))
    if kind is float and type(value) is int:
        value = float(value)
    if value is not None and type(value) is not kind:
        die(f'--{key}={value!r}: expected {kind.__name__}')
    if kind is str and value is not None:
        value = os.path.expanduser(value)
    return value


def field_help(cls):
    """{setting: help}, read off the source of cls and of its bases: the comment on the line of a
    field, or else the comment lines right above it."""
    helps = {}
    for c in reversed(cls.__mro__[:-1]):
        above = []
        for line in inspect.getsource(c).splitlines():
            code, _, comment = line.strip().partition('# ')
            if line.strip() and not code:  # a comment line: the help of the field below it
                above.append(comment)
                continue
            name = code.split(':')[0]
            if name.isidentifier():
                helps[name] = comment or ' '.join(above)
            above = []
    return helps


def help_text(cfg, presets):
    """--help: the script's docstring, its presets, then each setting: its default, its range or
    choices and its help."""
    helps = field_help(type(cfg))
    lines = [sys.modules[type(cfg).__module__].__doc__.strip(), '',
             f'presets: {", ".join(presets)}', 'settings (--key=value):']
    for f in fields(cfg):
        limits = f'({f.metadata["rule"][0]})  ' if 'rule' in f.metadata else ''
        name = f'  --{f.name}={f.default!r}'.ljust(34)
        lines.append(name + '  ' + limits + helps.get(f.name, ''))
    return '\n'.join(lines)

# ------------------------------------------------------ the model a run builds


def from_model(cfg):
    """The settings left at None that the architecture --model defines (an entry of beitv2.PRESETS,
    where each architecture is defined once) take its value; a value given overrides it."""
    kind = type(beitv2.PRESETS[type(cfg).model])  # this script's kind of model: its default's
    names = [name for name, arch in beitv2.PRESETS.items() if isinstance(arch, kind)]
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
    out = replace(arch, **{**own, **fixed})
    if out.embed_dim % out.num_heads:
        die(f'--embed_dim={out.embed_dim} is not divisible by --num_heads={out.num_heads}')
    if isinstance(out, beitv2.BEiTConfig) and out.early_layers > out.depth:
        die(f'--early_layers={out.early_layers}: the model has {out.depth} blocks')
    return out
