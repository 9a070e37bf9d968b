"""Tests of the stage scripts and what they share (settings.py, engine.py, data.py, upernet.py,
pictures.py, plot.py, bench.py, the README); test_beitv2.py tests the model.

    python -m pytest -q test_beitv2.py test_scripts.py               # everything (what CI runs)
    python -m pytest -q test_beitv2.py test_scripts.py -m 'not slow' # without the script runs
"""

import argparse
import contextlib
import dataclasses
import gzip
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import types
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Dict

# before torch loads OpenMP, as the scripts run themselves
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps

import beitv2
import bench
import data
import engine
import evaluate as E
import pictures
import plot
import pretrain
import settings
import train_tokenizer as TT
import upernet
from data import IMAGENET_MEAN, IMAGENET_STD
from test_beitv2 import HERE, close, free_port, tiny_beit

TINY_TOK = [
    '--img_size=16',
    '--patch_size=4',
    '--embed_dim=32',
    '--depth=1',
    '--num_heads=2',
    '--codebook_size=32',
    '--code_dim=8',
    '--batch_size=8',
    '--warmup_steps=1',
    '--log_every=1',
]


TINY_PRE = [
    '--img_size=16',
    '--patch_size=4',
    '--embed_dim=32',
    '--depth=2',
    '--num_heads=2',
    '--early_layers=1',
    '--batch_size=8',
    '--warmup_steps=1',
    '--log_every=1',
]


SCRIPTS = {
    'train_tokenizer.py': TT,
    'pretrain.py': pretrain,
    'evaluate.py': E,
    'pictures.py': pictures,
    'bench.py': bench,
}


def run_script(script, *args, ok=True, cwd=HERE):
    """SCRIPT's main(args) in this process, as `python SCRIPT ARGS` would run it: -> its exit code,
    stdout and stderr. The process's global state (threads, RNGs, signal handlers, folder) is
    restored afterwards."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    threads, rng, py_rng, handlers = (
        torch.get_num_threads(),
        torch.get_rng_state(),
        random.getstate(),
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
    )
    here = os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            SCRIPTS[script].main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        random.setstate(py_rng)
        for s, h in handlers.items():
            signal.signal(s, h)
    p = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    assert (code == 0) == ok, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope='module')
def tokenizer_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp('tok')
    run_script('train_tokenizer.py', *TINY_TOK, '--steps=3', '--workers=0', f'--out_dir={out}')
    return out / 'ckpt.pt'


@pytest.fixture(scope='module')
def pretrain_ckpt(tokenizer_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp('pre')
    run_script(
        'pretrain.py',
        *TINY_PRE,
        '--steps=2',
        '--workers=0',
        f'--tokenizer={tokenizer_ckpt}',
        f'--out_dir={out}',
    )
    return out / 'ckpt.pt'


EVAL_TINY = ['--img_size=16', '--batch_size=8', '--workers=0', '--log_every=1', '--data=demo:48']


# ------------------------------------------- engine.py: optimizer groups, checkpoints


def test_param_groups_official_rules():
    m = tiny_beit()
    groups = engine.param_groups(m, 0.05)
    decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    names = {n for n, p in m.named_parameters() if id(p) in decayed}
    assert 'mask_token' in names and 'rel_pos_bias.relative_position_bias_table' in names
    assert (
        'cls_token' not in names and 'blocks.0.gamma_1' not in names and 'lm_head.bias' not in names
    )
    clf = beitv2.ViT(beitv2.classifier_config(m.cfg, 10))
    scales = {
        n: g['lr_scale']
        for g in engine.param_groups(clf, 0.05, 0.5, depth=3)
        for n, p in clf.named_parameters()
        if any(p is q for q in g['params'])
    }
    assert scales['patch_embed.proj.weight'] == 0.5**4 and scales['cls_token'] == 0.5**4
    assert scales['blocks.0.norm1.weight'] == 0.5**3 and scales['blocks.2.mlp.fc1.weight'] == 0.5
    assert scales['head.weight'] == 1.0


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))

    p = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'x': Evil()}, p)
    with pytest.raises(SystemExit):
        engine.read_checkpoint(p)
    err = capsys.readouterr().err
    assert 'refused to load' in err and '(posix.system)' in err and 'weights_only' not in err
    ok = tmp_path / 'ok.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'args': argparse.Namespace(lr=1.0)}, ok)
    assert torch.equal(beitv2.state_dict_of(engine.read_checkpoint(ok))['w'], torch.ones(1))


def junk_files(tmp_path):
    good = tmp_path / 'good.pt'
    torch.save({'model': {'w': torch.zeros(5000)}}, good)
    data = good.read_bytes()
    files = {
        'truncated': data[: len(data) // 2],
        'random bytes': random.Random(0).randbytes(4000),
        'text': b'hello\n',
        'empty': b'',
    }
    for name, content in files.items():
        (tmp_path / f'{name}.pt').write_bytes(content)
    return [tmp_path / f'{name}.pt' for name in files]


def test_read_checkpoint_gives_one_line_for_junk(tmp_path, capsys):
    for path in junk_files(tmp_path) + [tmp_path / 'missing.pt']:
        with pytest.raises(SystemExit):
            engine.read_checkpoint(path)
        err = capsys.readouterr().err
        assert 'not a readable checkpoint' in err or 'no such file' in err
        assert err.count('\n') == 1, err
        assert 'weights_only' not in err


# --------------------- common.py: settings, presets, devices, run safety, data


def test_every_preset_parses_and_holds_the_paper_recipe():
    for mod in (TT, pretrain, E, bench):
        for name in mod.PRESETS:
            data_arg = [] if mod is bench else ['--data=x']
            settings.configure(mod.Config(), mod.PRESETS, [f'--preset={name}'] + data_arg)
    p = settings.configure(
        pretrain.Config(), pretrain.PRESETS, ['--preset=base_1600', '--accum=2', '--data=x']
    )
    assert (p.lr, p.weight_decay, p.clip_grad, p.betas, p.epochs, p.warmup_epochs) == (
        1.5e-3,
        0.05,
        3.0,
        (0.9, 0.999),
        1600,
        10,
    )
    assert (
        p.min_crop_scale,
        p.layer_scale,
        p.early_layers,
        p.drop_path,
        p.batch_size,
        p.accum,
    ) == (0.2, 0.1, 9, 0.1, 128, 2)
    p = settings.configure(pretrain.Config(), pretrain.PRESETS, ['--preset=large_300', '--data=x'])
    assert (p.betas, p.drop_path, p.layer_scale, p.early_layers, p.depth) == (
        (0.9, 0.98),
        0.0,
        1e-5,
        21,
        24,
    )
    t = settings.configure(TT.Config(), TT.PRESETS, ['--preset=clip_3x', '--data=x'])
    assert (
        t.lr,
        t.betas,
        t.weight_decay,
        t.epochs,
        t.codebook_size,
        t.code_dim,
        t.decoder_depth,
    ) == (5e-5, (0.9, 0.99), 1e-4, 100, 8192, 32, 3)

    # evaluation recipes: official get_started_for_image_classification.md, upernet_beit_* configs
    def ev(name):
        e = settings.configure(E.Config(), E.PRESETS, [f'--preset={name}', '--data=x'])
        return (e.batch_size * e.accum, e.lr, e.epochs, e.warmup_epochs, e.layer_decay, e.drop_path)

    assert ev('finetune_large') == (128, 2e-4, 50, 5, 0.8, 0.2)  # x 8 GPUs = 1024
    assert ev('finetune_large_300')[1] == 5e-4
    assert ev('finetune_21k_base') == (512, 6e-4, 90, 20, 0.75, 0.1)  # x 8 GPUs = 4096
    assert ev('finetune_21k_large')[-1] == 0.2
    assert ev('finetune_21kto1k_base') == (128, 5e-5, 30, 20, 0.75, 0.1)
    assert ev('finetune_21kto1k_large') == (128, 7e-5, 20, 5, 0.8, 0.25)
    for name in ('finetune_21kto1k_base', 'finetune_21kto1k_large'):
        assert (E.PRESETS[name]['mixup'], E.PRESETS[name]['cutmix']) == (0.0, 0.0)

    def seg(name):
        e = settings.configure(E.Config(), E.PRESETS, [f'--preset={name}', '--data=x'])
        return (e.lr, e.layer_decay, e.drop_path, e.seg_layers, e.steps, e.img_size, e.batch_size)

    assert seg('segment_base') == (5e-5, 0.75, 0.15, (3, 5, 7, 11), 160000, 512, 2)
    assert seg('segment_base_21ktoade20k')[:2] == (5e-5, 0.85)
    assert seg('segment_large') == (4e-5, 0.9, 0.2, (7, 11, 15, 23), 160000, 512, 2)
    assert seg('segment_large_21ktoade20k')[:2] == (3e-5, 0.9)


def test_a_recipe_says_its_batch_when_the_run_differs(capsys):
    """Presets are per rank: on 8 ranks base_1600 runs 1024 of the recipe's 2048 images per step."""
    optimizer = types.SimpleNamespace(param_groups=[dict(lr_scale=1.0)], defaults=dict(lr=1e-3))
    for world, preset, flags, want in [
        (8, 'base_1600', [], '2048 images per step, this run 1024: --accum=2'),
        (8, 'base_1600', ['--accum=2'], None),
        (3, 'base_1600', [], 'this run 384: batch_size x accum x ranks = 2048'),
        (1, 'demo', [], None),
    ]:
        args = [f'--preset={preset}', '--data=x'] + flags
        cfg = settings.configure(pretrain.Config(), pretrain.PRESETS, args)
        env = types.SimpleNamespace(world=world, device='cpu', dtype='fp32', print=print)
        engine.plan(cfg, env, [None] * 10, optimizer)  # 10 batches an epoch
        out = capsys.readouterr().out
        assert (want in out) if want else 'note: the recipe' not in out, (preset, world, out)
    for mod, name, batch in [
        (TT, 'clip_3x', 512),
        (E, 'finetune_base', 1024),
        (E, 'finetune_21k_large', 4096),
        (E, 'segment_base', 16),
        (E, 'linear_base', 16384),
    ]:
        cfg = settings.configure(mod.Config(), mod.PRESETS, [f'--preset={name}', '--data=x'])
        assert cfg.recipe_batch == batch


def test_scripts_build_the_architecture_from_beitv2_presets():
    """One definition per architecture: --model names a beitv2.PRESETS entry, settings override
    it."""
    args = ['--model=beitv2_base_patch16_224', '--depth=10']
    p = settings.configure(pretrain.Config(), pretrain.PRESETS, args)
    m = settings.model_config(p, vocab_size=64)
    assert m == dataclasses.replace(
        beitv2.PRESETS['beitv2_base_patch16_224'], depth=10, vocab_size=64
    )
    demo = settings.configure(pretrain.Config(), pretrain.PRESETS, [])
    demo = settings.model_config(demo, vocab_size=512)
    assert demo == beitv2.PRESETS['beitv2_demo']
    t = settings.configure(TT.Config(), TT.PRESETS, [])
    assert settings.model_config(t, teacher_dim=512) == beitv2.PRESETS['vqkd_demo']


@pytest.mark.parametrize(
    'arg,msg',
    [
        ('--batch_size=0', 'must be >= 1'),
        ('--lr=-1e-3', 'must be > 0'),
        ('--log_every=0', 'must be >= 1'),
        ('--accum=0', 'must be >= 1'),
        ('--workers=-1', 'must be >= 0'),
        ('--steps=-1', 'must be >= 1'),
    ],
)
def test_ranges_beside_the_fields_are_checked(arg, msg, capsys):
    with pytest.raises(SystemExit):
        settings.configure(pretrain.Config(), pretrain.PRESETS, [arg])
    err = capsys.readouterr().err
    assert msg in err and arg.split('=')[0] in err and err.count('\n') == 1


@pytest.mark.parametrize(
    'script,arg,msg',
    [
        ('evaluate', '--feature=CLS', "must be one of 'cls', 'mean'"),
        ('evaluate', '--linear_recipe=BEIT', "must be one of 'mae', 'beit'"),
        ('evaluate', '--mode=attention', 'must be one of'),
        ('evaluate', '--knn_t=0', 'must be > 0'),
        ('pretrain', '--betas=(0.9,)', 'two numbers in [0, 1)'),
        ('pretrain', '--betas=(2.0, 3.0)', 'two numbers in [0, 1)'),
        ('pretrain', '--dtype=bfloat16', 'must be one of'),
        ('pretrain', '--model=vqkd_demo', 'for this stage; choose from beitv2_demo'),
        ('train_tokenizer', '--model=beitv2_demo', 'for this stage; choose from vqkd_demo'),
        ('evaluate', '--smoothing=-0.5', 'in [0, 1)'),
        ('evaluate', '--smoothing=1.0', 'in [0, 1)'),
        ('evaluate', '--reprob=2.0', 'in [0, 1]'),
        ('evaluate', '--drop_path=2.0', 'in [0, 1)'),
        ('evaluate', '--layer_decay=1.5', 'in [0, 1]'),
        ('evaluate', '--mixup=-1', '>= 0'),
        ('evaluate', '--cutmix=-1', '>= 0'),
        ('evaluate', '--backbones=()', 'some of'),
        ('evaluate', "--backbones=('checkpoint','randm')", 'some of checkpoint, random, pixels'),
        ('evaluate', '--backbones=checkpoint,randm', 'some of'),
        ('pretrain', '--betas=0.9,x', 'two numbers'),
        ('evaluate', '--labels=0%', 'all, a share'),
        ('evaluate', '--labels=ten', 'all, a share'),
        ('evaluate', '--seg_layers=(1,2)', '4 block indices'),
        ('evaluate', '--seg_stride=-1', '>= 0'),
        ('pretrain', '--seed=1234567890123456789012', 'in [0, '),
        ('pretrain', '--seed=-1', 'in [0, '),
    ],
)
def test_choices_and_models_beside_the_fields_are_checked(script, arg, msg, capsys):
    mod = __import__(script)
    with pytest.raises(SystemExit):
        settings.configure(mod.Config(), mod.PRESETS, [arg])
    err = capsys.readouterr().err
    assert msg in err and err.count('\n') == 1, err


@pytest.mark.parametrize('script', ['train_tokenizer', 'pretrain', 'evaluate'])
def test_idle_threads_sleep_so_a_busy_machine_does_not_stall_each_op(script):
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: when a stage script is started, the
    policy is PASSIVE by the time torch first loads (docs/speed.md has the busy / quiet times)."""
    hook = (
        'import builtins, os\n'
        'seen, load = [], builtins.__import__\n'
        'def spy(name, *a, **k):\n'
        '    if name == "torch" and not seen:\n'
        '        seen.append(os.environ.get("OMP_WAIT_POLICY"))\n'
        '    return load(name, *a, **k)\n'
        'builtins.__import__ = spy\n'
        f'import {script}\n'
        'print(seen)\n'
    )
    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    p = subprocess.run(
        [sys.executable, '-c', hook], cwd=HERE, env=env, capture_output=True, text=True
    )
    assert p.stdout.strip() == "['PASSIVE']", p.stdout + p.stderr


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_help_lists_every_setting_with_its_default_range_and_help(script):
    p = run_script(script, '--help')
    rows = {
        line.split('=')[0].strip(): line
        for line in p.stdout.splitlines()
        if line.startswith('  --')
    }
    assert list(rows) == ['--' + f.name for f in dataclasses.fields(SCRIPTS[script].Config())]
    silent = [k for k, line in rows.items() if len(line.split(maxsplit=1)) < 2]
    assert not silent, f'settings without a help text: {silent}'
    if script == 'evaluate.py':
        assert re.search(r'--knn_t=0.07 +\(> 0\)  the temperature', p.stdout)


def test_bench_times_the_demo_model_and_the_loader():
    """The demo model (its targets from a tokenizer of its own 512 codes) and the loader: a line
    each."""
    p = run_script('bench.py', '--model=beitv2_demo', '--img_size=32', '--steps=2', '--warmup=1')
    assert 'ours: student step' in p.stdout and 'ours: full step (+ encode)' in p.stdout
    p = run_script(
        'bench.py', '--what=loader', '--img_size=32', '--workers=1', '--steps=2', '--warmup=1'
    )
    assert 'ours: pretrain' in p.stdout and 'ms per image per worker' in p.stdout


@pytest.mark.parametrize('transform', ['tokenizer', 'finetune'])
def test_bench_times_each_stages_data_path(transform, capsys):
    bench.main(
        [
            '--what=loader',
            '--img_size=32',
            '--workers=0',
            '--steps=2',
            '--warmup=1',
            f'--transform={transform}',
        ]
    )
    assert f'ours: {transform}' in capsys.readouterr().out


def test_a_tuple_of_words_needs_no_quotes():
    for arg, want in [
        ('checkpoint,random', ('checkpoint', 'random')),
        ("('pixels',)", ('pixels',)),
    ]:
        assert settings.configure(E.Config(), E.PRESETS, [f'--backbones={arg}']).backbones == want


def test_bad_sizes_end_in_one_line(capsys):
    cfg = settings.configure(
        pretrain.Config(), pretrain.PRESETS, ['--embed_dim=100', '--num_heads=3']
    )
    deep = settings.configure(pretrain.Config(), pretrain.PRESETS, ['--early_layers=8'])  # of 6
    for call, msg in [
        (lambda: settings.model_config(cfg, vocab_size=8), 'not divisible by --num_heads=3'),
        (lambda: settings.model_config(deep, vocab_size=8), '--early_layers=8: the model has 6'),
        (lambda: data.build_dataset('demo:0', 'train', 16), 'N >= 1'),
        (lambda: data.build_dataset('demo:-5', 'train', 16), 'N >= 1'),
        (lambda: data.build_dataset('demo:abc', 'train', 16), 'N >= 1'),
    ]:
        with pytest.raises(SystemExit):
            call()
        err = capsys.readouterr().err
        assert msg in err and err.count('\n') == 1, err
    assert len(data.build_dataset('demo:7', 'train', 16)) == 7


def test_topk_is_limited_by_the_class_count():
    scores, y = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2])
    assert E.topk_acc(scores, y) == {'top1': 50.0}  # 3 classes: no top-5
    assert set(E.topk_acc(torch.randn(4, 6), torch.arange(4))) == {'top1', 'top5'}


def test_a_log_line_cut_short_is_dropped_with_a_note(tmp_path, capsys):
    log = tmp_path / 'log.jsonl'
    # a full disk
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    engine.Logger(str(tmp_path), types.SimpleNamespace(master=True, print=print), 2)
    assert 'line 3 is cut short' in capsys.readouterr().out
    assert [r['step'] for r in engine.read_log(log)] == [1, 2] and log.read_text().count('\n') == 2
    assert [r['step'] for r in plot.read_log(log)] == [1, 2]  # plot.py reads logs without torch


def test_plot_reads_every_log_a_run_writes(tmp_path, monkeypatch):
    """Evaluation logs hold val_* lines without the training keys; compare rows of two checkpoints
    in one folder are not averaged together. A stand-in for matplotlib records what would be
    drawn."""

    class Axis:
        def __init__(self):
            self.lines, self.bars = [], []

        def plot(self, x, y, *a, **k):
            self.lines.append((list(x), list(y), k.get('label')))

        def bar(self, x, h, *a, **k):
            self.bars.append(h)

        def set_xticks(self, ticks, labels):
            self.ticks = labels

        def ticklabel_format(self, **k):  # a '1e-3' offset above the axes runs into the title
            raise AssertionError('no offset text: lr values are printed as they are')

        def __getattr__(self, name):  # titles, ticks, legends: not checked
            return lambda *a, **k: None

    axes = []

    class Plt:
        def subplots(self, *a, squeeze=True, **k):
            n = a[1] if len(a) > 1 else 1
            axes[:] = [Axis() for _ in range(n)]
            fig = types.SimpleNamespace(
                suptitle=lambda *a, **k: None,
                tight_layout=lambda: None,
                savefig=lambda *a, **k: None,
            )
            return fig, [axes] if not squeeze else axes[0]

        def close(self, fig):
            pass

    rows = [
        dict(step=1, loss=2.0, lr=0.1),
        dict(step=2, loss=1.0, lr=0.2),
        dict(step=2, val_top1=40.0),
    ]
    plot.plot_curves(Plt(), {'eval': rows}, 'eval', tmp_path / 'c.png')
    drawn = {label: (x, y) for a in axes for x, y, label in a.lines}
    assert drawn['loss'] == ([1, 2], [2.0, 1.0]) and drawn['val_top1'] == ([2], [40.0])
    res = []
    for c, t in (('a.pt', 10.0), ('b.pt', 50.0), ('b.pt', 60.0)):
        for probe in ('linear probe', 'k-NN'):
            res.append(
                dict(mode='compare_run', checkpoint=c, backbone='pretrained', probe=probe, top1=t)
            )
    plot.plot_results(Plt(), res, 'compare', tmp_path / 'r.png')
    assert axes[0].bars == [55.0, 55.0]  # b.pt's alone
    assert axes[0].ticks == ['linear probe', 'k-NN']  # as compare prints them
    scratch = [dict(step=2, val_top1=30.0), dict(step=4, val_top1=35.0)]
    plot.plot_curves(
        Plt(), {'ft': rows, 'scratch': scratch}, 'val_top1', tmp_path / 't.png', only='val_top1'
    )
    assert axes[0].lines == [([2], [40.0], 'ft'), ([2, 4], [30.0, 35.0], 'scratch')]
    # plot.py itself, on a run's folder, its matplotlib the stand-in
    pyplot = Plt()
    matplotlib = types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot)
    monkeypatch.setitem(sys.modules, 'matplotlib', matplotlib)
    monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', pyplot)
    (tmp_path / 'log.jsonl').write_text(
        ''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 3, "lo'
    )
    (tmp_path / 'result.json').write_text(''.join(json.dumps(r) + '\n' for r in res))
    written = plot.main([str(tmp_path)])
    assert [Path(w).name for w in written] == ['curves.png', 'results.png']
    assert plot.main(['--together=val_top1', str(tmp_path)]) == ['val_top1.png']
    for args in ([str(tmp_path / 'nothing')], ['--together=loss', str(tmp_path / 'nothing')]):
        with pytest.raises(SystemExit, match='nothing'):
            plot.main(args)


def test_a_16_bit_png_is_scaled_not_white(tmp_path):
    Image.fromarray((np.arange(256 * 4, dtype=np.uint16).reshape(32, 32) * 64)).save(
        tmp_path / 'g.png'
    )
    img = np.asarray(data.load_image(tmp_path / 'g.png'))
    assert (
        img.shape == (32, 32, 3) and img.min() == 0 and 250 <= img.max() <= 255 and img.mean() < 200
    )


BICUBIC = T.InterpolationMode.BICUBIC


def photo(seed, h=240, w=320):
    """A photo-like picture: colour 1/f noise on a left-to-right brightness ramp (a crop's mean is
    not the image's)."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(w), np.fft.fftfreq(h))) + 1 / w
    noise = np.real(
        np.fft.ifft2(np.fft.fft2(np.random.default_rng(seed).normal(size=(3, h, w))) / f)
    )
    return Image.fromarray(
        (40 * noise / noise.std() + np.linspace(40, 200, w))
        .transpose(1, 2, 0)
        .clip(0, 255)
        .astype(np.uint8)
    )


def official_order(img, box, flip, jitter, size, whole=True):
    """DataAugmentationForBEiT's order and ops: ColorJitter's PIL steps on the whole image, flip,
    crop `box`, resize (PIL bicubic). whole=False jitters the crop instead: contrast's mean from the
    crop, the mistake to avoid."""

    def jittered(im):
        order, *factors = jitter
        for op in order.tolist():
            im = (
                (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[op](
                    im, factors[op]
                )
                if op < 3
                else im
            )
        return im

    region = TF.crop(
        TF.hflip(jittered(img) if whole else img) if flip else jittered(img) if whole else img, *box
    )
    return TF.pil_to_tensor(TF.resize(region if whole else jittered(region), [size, size], BICUBIC))


@pytest.mark.parametrize('fast', [True, False])
def test_pretraining_views_equal_the_official_order(fast):
    """data.views (crop the mirrored box, jitter the crop with contrast's mean from the whole image,
    resize, flip) against the official order, on the same 320x240 pictures (the mean read off every
    3rd pixel and row) and drawn box, flip and jitter: within 0.25 levels of 255 on average and 4 at
    the 99.9th percentile (torch's bicubic against PIL's; the subsampled mean). The negative
    control, contrast's mean from the crop, fails the same bounds."""
    diffs = []
    for k in range(24):
        img = photo(k)
        torch.manual_seed(k)
        jitter = T.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), None)[:4]
        flip, box = (
            torch.rand(1).item() < 0.5,
            T.RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3)),
        )
        args = img, box, flip, jitter
        out = data.views(*args, (64,))[0] if fast else official_order(*args, 64, whole=False)
        diffs.append((out.float() - official_order(*args, 64).float()).abs().flatten())
    d = torch.cat(diffs)
    assert (d.mean() <= 0.25 and d.quantile(0.999) <= 4) == fast, (d.mean(), d.quantile(0.999))


@pytest.mark.parametrize('min_scale', [0.2, 0.08])
def test_crop_boxes_and_flips_are_drawn_as_the_officials(min_scale):
    """Boxes and flips read back from 800 views of a picture whose red is the column and green the
    row: data.Crops through the loader's per-sample seeds against torchvision's RandomHorizontalFlip
    + RandomResizedCrop(scale 0.2-1) (the official crop's algorithm, there with Python's random):
    every mean (area, aspect, centre, flips) within 4 standard errors. The negative control: the
    tokenizer's scale 0.08 fails."""
    yy, xx = np.mgrid[0:192, 0:256]
    img, S, n = Image.fromarray(np.stack([xx, yy, 0 * xx], -1).astype(np.uint8)), 16, 800
    ds = data.Augmented([(img, 0)] * n, data.Crops((S,), min_scale), seed=0)
    ours = torch.stack([ds[(0, i)]['images'] for i in range(n)])
    official = T.Compose(
        [T.RandomHorizontalFlip(), T.RandomResizedCrop(S, (0.2, 1.0), interpolation=BICUBIC)]
    )
    torch.manual_seed(0)
    ref = torch.stack([TF.pil_to_tensor(official(img)) for _ in range(n)])

    def stats(v):
        r, g = v[:, 0].float(), v[:, 1].float()
        left, right, top, bottom = (
            r[:, S // 2, 0],
            r[:, S // 2, -1],
            g[:, 0, S // 2],
            g[:, -1, S // 2],
        )
        w, h = (right - left).abs(), bottom - top
        return dict(
            area=w * h,
            aspect=(w / h).log(),
            x=left + right,
            y=top + bottom,
            flip=(left > right).float(),
        )

    a, b = stats(ours), stats(ref)
    se = {k: 4 * (a[k].var() / n + b[k].var() / n).sqrt() for k in a}
    assert all((a[k].mean() - b[k].mean()).abs() <= se[k] for k in a) == (min_scale == 0.2), (a, b)


def test_odd_imagenet_files_load_through_the_pretraining_views(tmp_path):
    """A CMYK JPEG, a greyscale JPEG and a PNG named .JPEG (ImageNet has each): uint8 RGB views of
    two sizes, a mask."""
    (tmp_path / 'train' / 'c').mkdir(parents=True)
    img = photo(0)
    img.convert('CMYK').save(tmp_path / 'train/c/cmyk.JPEG')
    img.convert('L').save(tmp_path / 'train/c/grey.JPEG')
    img.save(tmp_path / 'train/c/png.JPEG', format='PNG')
    assert Image.open(tmp_path / 'train/c/cmyk.JPEG').mode == 'CMYK'
    ds = data.Augmented(
        data.build_dataset(str(tmp_path), 'train', 32, labels=False),
        data.Crops((32, 16), 0.2, 0.4, beitv2.MaskingGenerator((2, 2))),
        seed=0,
    )
    for i in range(3):
        views = ds[(0, i)]
        student, tok, mask = views['images'], views['tokenizer_images'], views['mask']
        assert student.shape == (3, 32, 32) and tok.shape == (3, 16, 16)
        assert student.dtype == tok.dtype == torch.uint8
        assert mask.shape == (4,) and student.float().std() > 5
    official = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(TF.to_tensor(TF.to_pil_image(student)))
    close(data.normalize(data.to_device(student[None], 'cpu'))[0], official, 1e-6)


@pytest.mark.parametrize('device', ['gpu0', 'cuda', 'cuda:1'])
def test_unknown_or_missing_device_is_an_error(device, capsys):
    if torch.cuda.is_available() and device != 'gpu0':
        pytest.skip('this machine has CUDA')
    with pytest.raises(SystemExit):
        engine.Env(device)
    assert 'device' in capsys.readouterr().err


def get_lr(step, steps, warmup_steps, lr, min_lr, schedule='cosine', epochs=0):
    cfg = types.SimpleNamespace(
        steps=steps,
        warmup_steps=warmup_steps,
        lr=lr,
        min_lr=min_lr,
        schedule=schedule,
        epochs=epochs,
    )
    return engine.get_lr(step, cfg, lr)


def test_lr_schedules():
    assert get_lr(0, 110, 10, 1.0, 0.0) == 0 and get_lr(5, 110, 10, 1.0, 0.0) == 0.5
    assert get_lr(10, 110, 10, 1.0, 0.0) == 1.0
    assert (
        abs(get_lr(60, 110, 10, 1.0, 0.0) - 0.5) < 1e-12 and get_lr(110, 110, 10, 1.0, 0.0) == 0.0
    )
    # mmcv's poly (power 1, min_lr 0) with linear warmup, as the official segmentation config sets
    # them
    for it in (0, 3, 1499, 1500, 80000, 159999):
        regular = 5e-5 * (1 - it / 160000)
        mmcv = regular * (1 - (1 - it / 1500) * (1 - 1e-6)) if it < 1500 else regular
        assert abs(get_lr(it, 160000, 1500, 5e-5, 0.0, 'poly') - mmcv) < 1e-18
    assert get_lr(0, 160000, 1500, 5e-5, 0.0, 'poly') == pytest.approx(5e-11)
    # BEiT v1 linear evaluation: torch's CosineAnnealingLR(T_max=epochs) stepped once per epoch, no
    # warmup
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=4e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5, eta_min=0)
    for epoch in range(5):
        for step in range(epoch * 10, epoch * 10 + 10):
            lr = get_lr(step, 50, 0, 4e-3, 0.0, 'cosine_epoch', 5)
            assert abs(lr - opt.param_groups[0]['lr']) < 1e-12
        sched.step()


def picture(size=40):
    """An RGB test picture with gradients, edges and every channel used (PIL)."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, size)
    noise = torch.rand(size, size, generator=g)
    img = torch.stack([x[None].expand(size, -1), x[:, None].expand(-1, size), noise])
    img[:, 10:20, 10:30] = torch.tensor([0.9, 0.1, 0.4])[:, None, None]
    return Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())


class FixedDraws:  # an rng whose random() draws are given: sign draws > 0.5 negate
    def __init__(self, *draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)


@pytest.mark.parametrize('level', [0.9, 0.35])
def test_randaugment_ops_follow_timms_formulas(level):
    """Each op of rand-m9-mstd0.5-inc1 at a magnitude level (timm's magnitude / 10), against the
    formulas of timm's auto_augment.py written out with PIL (fill (124, 116, 104), bicubic)."""
    img, ra, fill = picture(), data.RandAugment(), (124, 116, 104)
    assert ra.fill == fill

    def same(name, expected, *draws):
        got = ra.apply(img, name, level, FixedDraws(*draws))
        assert np.array_equal(np.asarray(got), np.asarray(expected)), name

    for name, op in (
        ('AutoContrast', ImageOps.autocontrast),
        ('Equalize', ImageOps.equalize),
        ('Invert', ImageOps.invert),
    ):
        same(name, op(img))
    # 0.2 <= 0.5: positive
    same('Rotate', img.rotate(level * 30, Image.BICUBIC, fillcolor=fill), 0.2)
    same('Rotate', img.rotate(-level * 30, Image.BICUBIC, fillcolor=fill), 0.7)  # negated
    same('PosterizeIncreasing', ImageOps.posterize(img, 4 - int(level * 4)))
    same('SolarizeIncreasing', ImageOps.solarize(img, 256 - int(level * 256)))
    add = int(level * 110)
    same('SolarizeAdd', img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3))
    for op in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        enhance = getattr(ImageEnhance, op)(img)
        same(op + 'Increasing', enhance.enhance(1 + level * 0.9), 0.2)
        same(op + 'Increasing', enhance.enhance(max(0.1, 1 - level * 0.9)), 0.7)
    for name, matrix in (
        ('ShearX', (1, level * 0.3, 0, 0, 1, 0)),
        ('ShearY', (1, 0, 0, level * 0.3, 1, 0)),
        ('TranslateXRel', (1, 0, level * 0.45 * 40, 0, 1, 0)),
        ('TranslateYRel', (1, 0, 0, 0, 1, level * 0.45 * 40)),
    ):
        moved = img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=fill)
        same(name, moved, 0.2)


def test_randaugment_draws_two_ops_at_half_probability():
    ra, img = data.RandAugment(), picture()
    rng = random.Random(0)
    changed = sum(not np.array_equal(np.asarray(ra(img, rng)), np.asarray(img)) for _ in range(400))
    assert 0.6 < changed / 400 < 0.85  # 1 - 0.5^2 = 0.75 get at least one op (most change them)


def test_randaugment_equals_timms_when_installed():
    """Same seed, same image: timm's rand_augment_transform('rand-m9-mstd0.5-inc1') with the
    official hyper-parameters, and ours. timm picks the ops with numpy: here it draws them as ours
    does."""
    aa = pytest.importorskip('timm.data.auto_augment')
    img = picture()
    hparams = dict(img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
    theirs = aa.rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)
    ours = data.RandAugment()
    real_choice = aa.np.random.choice
    aa.np.random.choice = lambda ops, n, replace=True, p=None: random.choices(ops, k=n)
    try:
        for seed in range(300):
            random.seed(seed)
            a = np.asarray(theirs(img))
            random.seed(seed)
            b = np.asarray(ours(img, random))
            assert np.array_equal(a, b), seed
    finally:
        aa.np.random.choice = real_choice


def test_eval_crop_and_erasing_follow_the_official_constants():
    sizes = {S: data.eval_transform(S).transforms[0].size for S in (224, 384, 512)}
    assert sizes == {224: 256, 384: 384, 512: 512}  # crop_pct 0.875 below 384 px, 1.0 from 384 on
    cfg = settings.configure(E.Config(), E.PRESETS, ['--preset=finetune_base', '--data=x'])
    erase = data.TrainTransform(32, 0.08, reprob=cfg.reprob).after.transforms[-1]
    assert erase.scale == (0.02, 1 / 3) and erase.ratio == (0.3, 1 / 0.3)  # timm's
    assert erase.p == 0.25


def test_linear_probe_heads_train_in_fp32_under_autocast():
    probe = E.Probe(tiny_beit(), E.Config(), 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = probe(torch.randn(2, 3, 32, 32))
    assert out[0].dtype == torch.float32


def test_linear_recipes_crop_as_their_official_scripts():
    crop = data.TrainTransform(32, 0.5).crop.transforms[0]
    assert crop.interpolation == T.InterpolationMode.BICUBIC  # MAE's
    crop = data.TrainTransform(32, 0.5, bilinear=True).crop.transforms[0]  # BEiT v1's
    assert crop.interpolation == T.InterpolationMode.BILINEAR and crop.scale == (0.5, 1.0)
    p = E.PRESETS['linear_beit']
    assert (p['schedule'], p['min_crop_scale'], p['epochs']) == ('cosine_epoch', 0.08, 100)


def test_out_dir_lock_refuses_a_second_run_and_goes_with_its_process(tmp_path, capsys):
    out = str(tmp_path / 'run')
    holder = (
        f'import sys, time; sys.path.insert(0, {str(HERE)!r}); import engine; '
        f'engine.claim_out_dir({out!r}); print("held", flush=True); time.sleep(60)'
    )
    other = subprocess.Popen([sys.executable, '-c', holder], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == 'held'
        with pytest.raises(SystemExit):
            engine.claim_out_dir(out)
        assert f'in use by another run (process {other.pid}@' in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    engine.claim_out_dir(out)  # its owner is gone, and the lock with it
    lock = engine.claim_out_dir(out)  # this process again
    engine.Env.close(types.SimpleNamespace(lock=lock, ddp=False))
    assert lock not in engine.HELD
    (tmp_path / 'file').write_text('x')
    with pytest.raises(SystemExit):
        engine.claim_out_dir(str(tmp_path / 'file'))
    assert 'cannot create it' in capsys.readouterr().err


def test_full_disk_removes_the_temp_file_and_says_so(tmp_path, monkeypatch, capsys):
    env = types.SimpleNamespace(master=True, ddp=False, world=1)
    (tmp_path / 'ckpt.pt').write_bytes(b'previous')

    def full(obj, f):
        Path(f).write_bytes(b'partial')
        raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0')

    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(SystemExit):
        engine.save_checkpoint(str(tmp_path / 'ckpt.pt'), env, step=1)
    err = capsys.readouterr().err
    assert 'no space left?' in err and 'intact' in err and err.count('\n') == 1
    assert not (tmp_path / 'ckpt.pt.tmp').exists()
    assert (tmp_path / 'ckpt.pt').read_bytes() == b'previous'


def test_resumed_log_is_cut_back_to_the_checkpoint(tmp_path):
    rows = [json.dumps(dict(step=s, loss=1.0)) + '\n' for s in range(1, 8)]
    (tmp_path / 'log.jsonl').write_text(''.join(rows))
    engine.Logger(str(tmp_path), types.SimpleNamespace(master=True, print=print), 4)
    steps = [json.loads(line)['step'] for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_fashion_mnist_files_load_as_rgb(tmp_path):
    """torchvision's FashionMNIST with download=False, on idx files the test writes."""
    raw = tmp_path / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for split, n in (('train', 6), ('t10k', 3)):
        imgs = torch.randint(0, 255, (n, 28, 28), dtype=torch.uint8)
        header = (2051).to_bytes(4, 'big') + n.to_bytes(4, 'big') + (28).to_bytes(4, 'big') * 2
        (raw / f'{split}-images-idx3-ubyte').write_bytes(header + imgs.numpy().tobytes())
        (raw / f'{split}-labels-idx1-ubyte').write_bytes(
            (2049).to_bytes(4, 'big') + n.to_bytes(4, 'big') + bytes(range(n))
        )
    ds = data.build_dataset(f'fashion_mnist:{tmp_path}', 'train', 32)
    assert len(ds) == 6 and len(data.build_dataset(f'fashion_mnist:{tmp_path}', 'val', 32)) == 3
    x = data.Augmented(ds, data.Crops((32,), 0.08), seed=0)[(0, 2)]['images']
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and ds[2][1] == 2


# --------------------------------------- train_tokenizer.py: teachers and runs


class TorchScriptTrap(torch.nn.Module):
    """A scripted module whose __setstate__, run by torch.jit.load, rewrites its buffer to 7."""

    def __init__(self):
        super().__init__()
        self.register_buffer('w', torch.ones(3))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Dict[str, torch.Tensor]:
        return {'w': self.w}

    @torch.jit.export
    def __setstate__(self, state: Dict[str, torch.Tensor]) -> None:
        self.w = state['w'] * 0 + 7
        self.training = False


def test_torchscript_weights_are_read_without_running_the_archive(tmp_path, capsys):
    path = tmp_path / 'trap.pt'
    torch.jit.script(TorchScriptTrap()).save(str(path))
    # torch.jit.load runs its code
    assert torch.equal(torch.jit.load(str(path)).w, torch.full((3,), 7.0))
    assert torch.equal(TT.read_torchscript(str(path))['w'], torch.ones(3))  # ours runs none of it

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "ran"}',))

    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    # the same archive, its data a pickle that calls
    with zipfile.ZipFile(tmp_path / 'evil.pt', 'w') as z:
        for n, b in files.items():
            z.writestr(n, pickle.dumps(Evil()) if n.endswith('/data.pkl') else b)
    with pytest.raises(SystemExit):
        TT.load_clip(str(tmp_path / 'evil.pt'))
    assert 'refused to load: it would call posix.system' in capsys.readouterr().err
    assert not (tmp_path / 'ran').exists()


def test_clip_teacher_from_torchscript_file(tmp_path):
    torch.manual_seed(0)
    ref = TT.CLIPVisual(width=64, layers=2, patch=8, grid=4, out_dim=16)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    holder = torch.nn.Module()
    holder.visual = ref
    holder.forward = ref.forward
    x = torch.rand(2, 3, 32, 32)
    torch.jit.trace(holder, x).save(str(tmp_path / 'ViT-B-16.pt'))  # the OpenAI file is TorchScript
    t = TT.load_clip(str(tmp_path / 'ViT-B-16.pt')).eval()
    with torch.no_grad():
        close(t(x), ref(x), atol=1e-6)
    assert t(x).shape == (2, 16, 16)


def test_dino_teacher_from_state_dict_file(tmp_path):
    torch.manual_seed(0)
    vit = beitv2.ViT(
        beitv2.ViTConfig(
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=1,
            layer_scale=0.0,
            abs_pos_emb=True,
            rel_pos='none',
        )
    )
    sd = vit.state_dict()
    for i in range(2):  # DINO names: one qkv.bias (with a k part), head.* to be dropped
        q, v = sd.pop(f'blocks.{i}.attn.q_bias'), sd.pop(f'blocks.{i}.attn.v_bias')
        sd[f'blocks.{i}.attn.qkv.bias'] = torch.cat([q, torch.randn(64), v])
    sd['head.weight'] = torch.zeros(3, 64)
    torch.save(sd, tmp_path / 'dino_vitbase16_pretrain.pth')
    t = TT.load_dino(str(tmp_path / 'dino_vitbase16_pretrain.pth')).eval()
    x = torch.rand(2, 3, 32, 32)
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    with torch.no_grad():
        close(t(x), vit.forward_patch_tokens((x - mean) / std), atol=1e-6)


@pytest.mark.parametrize('colour', [False, True])
def test_hog_teacher_is_structured(colour):
    t = TT.HOGTeacher(4, colour=colour)
    img = torch.zeros(1, 3, 16, 16)
    img[..., :, 8:] = 1.0  # a vertical edge between patch columns 1 and 2
    f = t(img)
    hog = 3 * 9 * 4 if colour else 9 * 4
    assert f.shape == (1, 16, hog + (3 if colour else 0))
    assert torch.allclose(f.mean(1), torch.zeros(1, f.shape[-1]), atol=1e-6)  # centred per image
    edge = f.view(4, 4, -1)[:, 1:3, :hog].abs().sum()
    flat = f.view(4, 4, -1)[:, [0, 3], :hog].std(0).sum()
    assert edge > 10 * flat  # gradients show up where the edge is
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0, :, 8:] = 1.0  # the same edge, black to red
    assert torch.equal(t(red), f) != colour  # the default target sees geometry, not colour


@pytest.mark.slow
def test_train_tokenizer_script_writes_loadable_checkpoint(tokenizer_ckpt):
    tok = beitv2.load_tokenizer(tokenizer_ckpt)
    assert tok.quantize.initted.item() == 1
    assert tok.encode(torch.rand(2, 3, 16, 16)).shape == (2, 16)
    log = [
        json.loads(line) for line in (tokenizer_ckpt.parent / 'log.jsonl').read_text().splitlines()
    ]
    assert [r['step'] for r in log] == [1, 2, 3] and all(math.isfinite(r['loss']) for r in log)


@pytest.mark.slow
def test_tokenizer_scores_the_val_split_every_eval_every_steps(tmp_path):
    """--eval_every: the cosine to the teacher and the codebook's usage on the val split (official
    --calculate_codebook_usage), the last equal to the saved tokenizer's codes of the centre
    crops."""
    run_script(
        'train_tokenizer.py',
        *TINY_TOK,
        '--steps=4',
        '--eval_every=2',
        '--workers=0',
        '--data=demo:32',
        f'--out_dir={tmp_path}',
    )
    log = (tmp_path / 'log.jsonl').read_text().splitlines()
    scored = [json.loads(line) for line in log if 'val_cosine' in line]
    assert [r['step'] for r in scored] == [2, 4]
    tok = beitv2.load_tokenizer(tmp_path / 'ckpt.pt')
    crops = data.eval_transform(16, normalized=False)
    val = data.Mapped(data.build_dataset('demo:32', 'val', 16), crops)
    images = torch.stack([val[i][0] for i in range(len(val))])
    used = tok.encode(images).unique().numel()
    assert scored[-1]['val_codes_used'] == used and -1 < scored[-1]['val_cosine'] < 1


@pytest.mark.slow
@pytest.mark.parametrize('sync', [True, False])
def test_torchrun_tokenizer_codebook_identical_on_ranks(tmp_path, sync):
    out = tmp_path / 'ddp'
    # train_tokenizer.main under torchrun; each rank saves its codebook
    helper = tmp_path / 'ddp_check.py'
    helper.write_text(f'''import os, sys, torch
sys.path.insert(0, {str(HERE)!r})
import beitv2, train_tokenizer
beitv2.NormEMACodebook.sync = sys.argv[2] == 'True'
model = train_tokenizer.main(sys.argv[3:] + ['--out_dir=' + sys.argv[1]])
path = os.path.join(sys.argv[1], 'codebook_rank' + os.environ['RANK'] + '.pt')
torch.save(model.quantize.weight, path)
''')
    p = subprocess.run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node=2',
            '--standalone',
            str(helper),
            str(out),
            str(sync),
            *TINY_TOK,
            '--steps=3',
            '--workers=0',
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    # DDP as this torch wants it
    assert 'FutureWarning' not in p.stderr and 'broadcast_buffers' not in p.stderr
    w0, w1 = (torch.load(out / f'codebook_rank{r}.pt') for r in range(2))
    assert torch.equal(w0, w1) == sync  # with sync off the same check fails: ranks disagree


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    p = run_script(
        'train_tokenizer.py',
        *TINY_TOK,
        '--steps=6',
        '--workers=0',
        '--lr=1e30',
        '--ckpt_every=1',
        f'--out_dir={tmp_path}',
        ok=False,
    )
    assert (
        p.returncode == 2 and 'non-finite loss at step' in p.stderr and 'Traceback' not in p.stderr
    ), p.stderr[-800:]
    ckpt = engine.read_checkpoint(tmp_path / 'ckpt.pt')
    bad_step = int(p.stderr.split('at step ')[1].split(':')[0])
    assert ckpt['step'] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    w = max(
        v.abs().max().item() for v in ckpt['model'].values() if v.is_floating_point() and v.numel()
    )
    # what it holds, not "good"
    assert f'(step {bad_step - 1}), holds weights up to |w| = {w:.3g}' in p.stderr


@pytest.mark.slow
def test_tokenizer_vocabulary_mismatch_on_resume_is_a_clear_error(tokenizer_ckpt, tmp_path):
    other = tmp_path / 'tok16'
    run_script(
        'train_tokenizer.py',
        *TINY_TOK,
        '--codebook_size=16',
        '--steps=1',
        '--workers=0',
        f'--out_dir={other}',
    )
    args = [*TINY_PRE, '--steps=2', '--workers=0', f'--out_dir={tmp_path / "pre"}']
    run_script('pretrain.py', *args, f'--tokenizer={tokenizer_ckpt}')  # vocabulary 32
    p = run_script('pretrain.py', *args, f'--tokenizer={other / "ckpt.pt"}', ok=False)  # 16
    # the settings check comes first
    assert p.returncode == 2 and '--tokenizer is' in p.stderr, p.stderr[-800:]
    p = run_script(
        'pretrain.py',
        *args,
        '--steps=3',
        f'--tokenizer={other / "ckpt.pt"}',
        # allowed, but the weights cannot fit
        '--allow_change=steps,tokenizer',
        ok=False,
    )
    assert p.returncode == 2 and 'cannot resume' in p.stderr and 'lm_head' in p.stderr, p.stderr[
        -800:
    ]
    assert 'Traceback' not in p.stderr


# ----------------------------------------------------------------- pretrain.py


@pytest.mark.slow
def test_pretrain_script_writes_loadable_checkpoint(tokenizer_ckpt, tmp_path):
    p = run_script(
        'pretrain.py',
        *TINY_PRE,
        '--steps=3',
        '--workers=1',
        f'--tokenizer={tokenizer_ckpt}',
        f'--out_dir={tmp_path}',
    )
    assert 'mlm_acc_1' in p.stdout and 'mlm_acc_2' in p.stdout
    ckpt = engine.read_checkpoint(tmp_path / 'ckpt.pt')
    model = beitv2.load_state(
        beitv2.BEiTv2(beitv2.BEiTConfig(**ckpt['model_config'])), ckpt['model']
    )
    assert model.lm_head.out_features == 32
    clf = beitv2.ViT(beitv2.classifier_config(model.cfg, 3))
    beitv2.load_state(clf, ckpt['model'], ignore=beitv2.PRETRAIN_ONLY + ('fc_norm', 'head'))


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch(tokenizer_ckpt, tmp_path):
    """2 micro-batches of 8 are the same 16 samples as one batch of 16 (same sampler order)."""
    args = [
        *TINY_PRE,
        f'--tokenizer={tokenizer_ckpt}',
        '--steps=3',
        '--workers=0',
        '--data=demo:64',
        '--dtype=fp32',
    ]  # the default is bf16 on CPUs with bf16 hardware
    run_script('pretrain.py', *args, '--batch_size=16', f'--out_dir={tmp_path / "big"}')
    run_script('pretrain.py', *args, '--batch_size=8', '--accum=2', f'--out_dir={tmp_path / "acc"}')
    a = engine.read_checkpoint(tmp_path / 'big' / 'ckpt.pt')['model']
    b = engine.read_checkpoint(tmp_path / 'acc' / 'ckpt.pt')['model']
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # AdamW ignores the gradient's scale; the logged norm does not (a missing 1/accum shows here)
    norms = [
        [
            json.loads(line)['gnorm']
            for line in (tmp_path / d / 'log.jsonl').read_text().splitlines()
        ]
        for d in ('big', 'acc')
    ]
    assert all(abs(x - y) < 1e-4 * x for x, y in zip(*norms)) and len(norms[0]) == 3


@pytest.mark.slow
def test_nan_without_a_checkpoint_says_so(tmp_path):
    p = run_script(
        'train_tokenizer.py',
        *TINY_TOK,
        '--steps=6',
        '--workers=0',
        '--lr=1e30',
        '--ckpt_every=100',
        f'--out_dir={tmp_path}',
        ok=False,
    )
    assert 'non-finite loss at step' in p.stderr and 'no checkpoint was written yet' in p.stderr, (
        p.stderr[-800:]
    )


def image_folder(root, classes=3, per_class=4, splits=('train',)):
    """An ImageNet-layout folder of small PNGs: ROOT/SPLIT/cK/J.png, each class its own colour."""
    for split in splits:
        for k in range(classes):
            (root / split / f'c{k}').mkdir(parents=True)
            for j in range(per_class):
                Image.new('RGB', (16, 16), (80 * k, 20 * j, 0)).save(
                    root / split / f'c{k}' / f'{j}.png'
                )
    return root


@pytest.mark.parametrize('script', ['train_tokenizer.py', 'pretrain.py', 'evaluate.py'])
def test_the_loop_reads_the_device_only_at_log_steps(
    script, tokenizer_ckpt, pretrain_ckpt, tmp_path, monkeypatch
):
    """Between log steps the host never waits for the device: no item / tolist / cpu / bool of a
    tensor (the host's own random draws aside (the loader's shuffle, torchvision's mixup), the first
    step's one-time work (k-means) and encode's value check of CPU input (on a GPU it checks the
    first call only)."""

    reads, steps = [], []

    def counted(name, orig):
        def read(self, *a, **k):
            stack = traceback.extract_stack()
            if not any(
                s in f.filename for f in stack for s in ('utils/data', 'torchvision/')
            ) and not any(f.name == 'encode' for f in stack):
                reads.append(len(steps))
            return orig(self, *a, **k)

        return read

    for name in ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__int__', '__float__'):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    get_lr = engine.get_lr
    monkeypatch.setattr(engine, 'get_lr', lambda *a: steps.append(get_lr(*a)) or steps[-1])
    args = {
        'train_tokenizer.py': TINY_TOK,
        'pretrain.py': [*TINY_PRE, f'--tokenizer={tokenizer_ckpt}'],
        'evaluate.py': [
            *EVAL_TINY[:-1],
            '--mode=finetune',
            f'--checkpoint={pretrain_ckpt}',
            '--lr=1e-3',
        ],
    }[script]
    run_script(
        script,
        *args,
        '--steps=9',
        '--log_every=4',
        '--ckpt_every=100',
        '--workers=1',
        '--data=demo:64',
        '--dtype=fp32',
        f'--out_dir={tmp_path}',
    )
    assert len(steps) == 9 and not [s for s in reads if s not in (0, 1, 4, 8, 9)], reads


def test_a_nan_between_log_steps_stops_before_the_next_checkpoint(
    tokenizer_ckpt, tmp_path, monkeypatch
):
    """A NaN loss at step 6 (no log, no checkpoint there) is found at step 8, before the checkpoint
    is written: the one of step 4 stands, finite."""
    forward, calls = beitv2.BEiTv2.forward, []

    def poisoned(self, *a, **k):
        logits, losses = forward(self, *a, **k)
        calls.append(1)
        return logits, dict(
            losses, loss=losses['loss'] * (float('nan') if len(calls) == 6 else 1.0)
        )

    monkeypatch.setattr(beitv2.BEiTv2, 'forward', poisoned)
    p = run_script(
        'pretrain.py',
        *TINY_PRE,
        f'--tokenizer={tokenizer_ckpt}',
        '--steps=10',
        '--log_every=5',
        '--ckpt_every=4',
        '--workers=0',
        f'--out_dir={tmp_path}',
        ok=False,
    )
    assert (
        'non-finite loss at step 6' in p.stderr and '(step 4), holds weights up to' in p.stderr
    ), p.stderr
    ckpt = engine.read_checkpoint(tmp_path / 'ckpt.pt')
    assert ckpt['step'] == 4 and all(
        v.isfinite().all() for v in ckpt['model'].values() if v.is_floating_point()
    )


def test_the_command_line_wins_over_the_preset(pretrain_ckpt, tmp_path):
    """--steps and --warmup_steps under a preset of epochs, and --lr (the tokenizer's scaled by its
    batch)."""
    folder = image_folder(tmp_path / 'd')
    p = run_script(
        'evaluate.py',
        '--preset=finetune_21k_base',
        f'--data={folder}',
        f'--checkpoint={pretrain_ckpt}',
        '--img_size=16',
        '--batch_size=4',
        '--accum=1',
        '--steps=2',
        '--warmup_steps=1',
        '--lr=0.01',
        '--workers=0',
        f'--out_dir={tmp_path / "out"}',
    )
    assert "note: --steps=2 replaces the preset's 90 epochs (270 steps)" in p.stdout, p.stdout
    assert "note: --warmup_steps=1 replaces the preset's 20 epochs (60 steps)" in p.stdout
    assert '2 steps, 1 warmup; peak lr 0.01' in p.stdout
    assert engine.read_checkpoint(tmp_path / 'out' / 'ckpt.pt')['step'] == 2
    p = run_script(
        'train_tokenizer.py',
        *TINY_TOK,
        '--lr=2e-3',
        '--steps=1',
        '--workers=0',
        f'--out_dir={tmp_path}/t',
    )
    assert 'peak lr 0.000125' in p.stdout  # 2e-3 per 128 images x 8 images
    assert settings.configure(
        TT.Config(), TT.PRESETS, ['--out_dir=~/x']
    ).out_dir == os.path.expanduser('~/x')


# --------------------------------- every script: exact resume, one-line errors


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def opt_tensors(opt):
    return {f'{i}.{k}': v for i, s in opt['state'].items() for k, v in s.items()}


@pytest.mark.slow
@pytest.mark.parametrize('script', ['train_tokenizer.py', 'pretrain.py'])
def test_resume_mid_epoch_is_bit_exact(script, tokenizer_ckpt, tmp_path, monkeypatch):
    # demo train split of 40 images, batch 8 -> 5 steps/epoch; stop at step 3 (--stop_after,
    # Ctrl-C), resume to 7
    pre = TINY_PRE + [f'--tokenizer={tokenizer_ckpt}', '--drop_path=0.1']
    extra = TINY_TOK if script == 'train_tokenizer.py' else pre
    args = [*extra, '--steps=7', '--workers=1', '--ckpt_every=100', '--data=demo:40']
    run_script(script, *args, f'--out_dir={tmp_path / "full"}')
    run_script(script, *args, f'--out_dir={tmp_path / "cut"}', '--stop_after=3')
    # Ctrl-C: at once
    assert engine.read_checkpoint(tmp_path / 'cut' / 'ckpt.pt')['step'] == 3 and not engine.graceful
    run_script(script, *args, f'--out_dir={tmp_path / "cut"}')  # auto-resume
    lr = engine.get_lr

    # step 3 reads its lr first; it ends, is saved, and the run stops
    def ctrl_c_in_step_3(step, *a):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return lr(step, *a)

    with monkeypatch.context() as m:
        m.setattr(engine, 'get_lr', ctrl_c_in_step_3)
        p = run_script(script, *args, f'--out_dir={tmp_path / "int"}', ok=False)
    assert p.returncode == 130 and 'interrupted at step 3' in p.stdout and not p.stderr
    run_script(script, *args, f'--out_dir={tmp_path / "int"}')
    a = engine.read_checkpoint(tmp_path / 'full' / 'ckpt.pt')
    for b in (engine.read_checkpoint(tmp_path / d / 'ckpt.pt') for d in ('cut', 'int')):
        assert a['step'] == b['step'] == 7
        same_state(a['model'], b['model'])
        same_state(opt_tensors(a['optimizer']), opt_tensors(b['optimizer']))


@pytest.mark.slow
def test_scripts_give_one_line_errors(tmp_path, tokenizer_ckpt, pretrain_ckpt):
    cases = [
        (['train_tokenizer.py', '--data=/nonexistent'], 'does not exist'),
        (['train_tokenizer.py', '--img_size=30'], 'divisible'),
        (['train_tokenizer.py', '--teacher=nope'], "must be one of 'hog'"),
        (['train_tokenizer.py', '--bogus=1'], 'unknown setting --bogus'),
        (['train_tokenizer.py', '--steps=abc'], 'not a int'),
        (
            ['pretrain.py', f'--tokenizer={tmp_path}/missing.pt'],
            'run `python train_tokenizer.py` first',
        ),
        (['pretrain.py', f'--tokenizer={tokenizer_ckpt}', '--img_size=32'], 'grid'),
        (['train_tokenizer.py', '--data=mnist:/x'], 'mnist is not a known dataset'),
    ]
    empty = image_folder(tmp_path / 'empty', classes=2)
    (empty / 'train' / 'no_image').mkdir()
    (empty / 'train' / 'no_image' / 'notes.txt').write_text('x')
    knn = ['evaluate.py', '--mode=knn', f'--checkpoint={pretrain_ckpt}', f'--out_dir={tmp_path}/k']
    cases.append(([*knn, f'--data={empty}'], 'no images found under'))  # labels: a class folder
    cases.append(([*knn, f'--data={empty}'], 'no_image'))  # holds no image
    cases.append(([*knn, f'--data={empty}/train/c0'], 'needs labels, an ImageNet-layout folder'))
    bad = tmp_path / 'bad'
    (bad / 'train' / 'cls').mkdir(parents=True)
    for name in ('x.png', 'y.png'):
        (bad / 'train' / 'cls' / name).write_bytes(b'not a png')
    cases.append(
        (
            [
                'train_tokenizer.py',
                *TINY_TOK,
                f'--data={bad}',
                '--batch_size=2',
                '--codebook_size=8',
                '--workers=2',
                f'--out_dir={tmp_path}/o',
            ],
            'unreadable image',
        )
    )
    for args, msg in cases:
        p = run_script(*args, ok=False)
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr[-1500:])
        assert 'Traceback' not in p.stderr and 'raise ' not in p.stderr, p.stderr  # not the source
        assert p.stderr.startswith('error: ') and p.stderr.count('\n') == 1, p.stderr


@pytest.mark.slow
def test_scripts_refuse_bad_files_and_changed_settings(tmp_path, tokenizer_ckpt, pretrain_ckpt):
    junk = junk_files(tmp_path)
    pre = [*TINY_PRE, '--workers=0', '--steps=2']
    cases = [
        (
            ['pretrain.py', *pre, f'--tokenizer={j}', f'--out_dir={tmp_path / "o"}'],
            'not a readable checkpoint',
        )
        for j in junk
    ]
    cases += [
        (
            ['pretrain.py', *pre, f'--tokenizer={pretrain_ckpt}', f'--out_dir={tmp_path / "o"}'],
            'not a tokenizer',
        ),
        (
            [
                'pictures.py',
                '--mode=codebook',
                f'--checkpoint={pretrain_ckpt}',
                f'--out_dir={tmp_path / "o"}',
            ],
            'not a tokenizer',
        ),
        (
            ['evaluate.py', '--mode=knn', f'--checkpoint={junk[0]}', f'--out_dir={tmp_path / "o"}'],
            'not a readable checkpoint',
        ),
        (
            [
                'pretrain.py',
                *pre,
                f'--tokenizer={tokenizer_ckpt}',
                f'--resume={junk[1]}',
                f'--out_dir={tmp_path / "o"}',
            ],
            'not a readable checkpoint',
        ),
        (
            [
                'pretrain.py',
                *pre,
                f'--tokenizer={tokenizer_ckpt}',
                '--num_mask=100',
                f'--out_dir={tmp_path / "o"}',
            ],
            'cannot mask 100 of 16',
        ),
        (
            [
                'train_tokenizer.py',
                *TINY_TOK,
                '--batch_size=1',
                '--codebook_size=64',
                f'--out_dir={tmp_path / "o"}',
            ],
            'k-means init needs at least codebook_size=64',
        ),
        (
            ['pretrain.py', *pre, f'--tokenizer={tokenizer_ckpt}', f'--out_dir={junk[2]}'],
            'cannot create it',
        ),
        (
            [
                'train_tokenizer.py',
                *TINY_TOK,
                f'--resume={pretrain_ckpt}',
                f'--out_dir={tmp_path / "o"}',
            ],
            'written by pretrain.py, not train_tokenizer.py',
        ),
        (
            [
                'train_tokenizer.py',
                *TINY_TOK,
                '--teacher=clip',
                f'--teacher_weights={tmp_path}/none.pt',
            ],
            'no such file',
        ),
        (
            [
                'train_tokenizer.py',
                *TINY_TOK,
                '--teacher=dino',
                f'--teacher_weights={pretrain_ckpt}',
                f'--out_dir={tmp_path / "o"}',
            ],
            '--teacher=dino --teacher_weights=',
        ),
        (
            [
                'evaluate.py',
                '--mode=segment',
                f'--checkpoint={pretrain_ckpt}',
                *EVAL_TINY,
                '--seg_layers=(0,1,1,5)',
                f'--out_dir={tmp_path / "o"}',
            ],
            '--seg_layers needs 4 block indices',
        ),
    ]
    for args, msg in cases:
        p = run_script(*args, ok=False)
        assert p.returncode == 2 and msg in p.stderr and 'Traceback' not in p.stderr, (
            args,
            p.stderr[-1500:],
        )
        assert p.stderr.strip().count('\n') == 0, p.stderr
    # a resume with settings that change the run's meaning is refused, naming the setting
    out = tmp_path / 'resume'
    run_script('pretrain.py', *pre, f'--tokenizer={tokenizer_ckpt}', f'--out_dir={out}')
    for arg, name in [
        ('--batch_size=4', '--batch_size'),
        ('--steps=3', '--steps'),
        ('--seed=1', '--seed'),
        (f'--tokenizer={tmp_path / "copy.pt"}', '--tokenizer'),
    ]:
        (tmp_path / 'copy.pt').write_bytes(tokenizer_ckpt.read_bytes())
        args = [
            a
            for a in [*pre, f'--tokenizer={tokenizer_ckpt}']
            if a.split('=')[0] != arg.split('=')[0]
        ]
        p = run_script('pretrain.py', *args, arg, f'--out_dir={out}', ok=False)
        assert name in p.stderr and 'allow_change' in p.stderr and 'Traceback' not in p.stderr, (
            p.stderr
        )
    p = run_script(
        'pretrain.py',
        *pre,
        '--steps=3',
        '--allow_change=steps',
        f'--tokenizer={tokenizer_ckpt}',
        f'--out_dir={out}',
    )
    assert 'resumed from' in p.stdout and engine.read_checkpoint(out / 'ckpt.pt')['step'] == 3
    steps = [json.loads(line)['step'] for line in (out / 'log.jsonl').read_text().splitlines()]
    # released at the end
    assert steps == [1, 2, 3] and os.path.realpath(out / 'lock') not in engine.HELD


@pytest.mark.slow
def test_evaluation_resumes_only_the_same_work(tokenizer_ckpt, tmp_path):
    """A probe checkpoint is resumed only for the same input: pretraining extended in place (the
    same path, other weights) is refused, naming --checkpoint; a finished run says so instead of
    training."""
    pre = tmp_path / 'pre'
    args = [*TINY_PRE, '--workers=0', f'--tokenizer={tokenizer_ckpt}', f'--out_dir={pre}']
    run_script('pretrain.py', *args, '--steps=2')
    p = run_script('pretrain.py', *args, '--steps=2')
    assert (
        'already complete (2 of 2 steps): nothing to train' in p.stdout
        and '(0 in this run' in p.stdout
    )
    probe = [
        *EVAL_TINY,
        '--mode=linear',
        '--steps=2',
        f'--checkpoint={pre / "ckpt.pt"}',
        f'--out_dir={tmp_path / "e"}',
    ]
    run_script('evaluate.py', *probe)
    # the same file, now other weights
    run_script('pretrain.py', *args, '--steps=3', '--allow_change=steps')
    p = run_script('evaluate.py', *probe, '--steps=3', '--allow_change=steps', ok=False)
    assert (
        '--checkpoint=' in p.stderr
        and 'holds other weights' in p.stderr
        and 'Traceback' not in p.stderr
    )


@pytest.mark.slow
def test_readme_commands_run_and_the_quick_start_learns(tmp_path, monkeypatch):
    """Every `python` command of the README, then of docs/results.md (not the ImageNet or
    Fashion-MNIST ones), in order, in one fresh folder, each stage and evaluation mode in its own
    default folder. The quick start runs at the smallest size that still shows learning, in fp32:
    300 tokenizer and 200 pretraining steps, the probes on 2,000 demo images with 100 linear-probe
    steps. Its pretrained [CLS] beats the random init by 17+ points on both probes: seeds 0, 1, 2 of
    all three stages gave k-NN margins of 25.1, 15.1, 18.7 (sd 5.1) and linear ones of 26.5, 16.6,
    17.3 (sd 5.5); 17 is over 3 sd of either. Every other command runs a few steps; then the
    README's Python blocks."""
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / 'PHOTO.jpg')
    learn = {
        'train_tokenizer.py': ['--steps=300'],
        'pretrain.py': ['--steps=200'],
        'evaluate.py': ['--data=demo:2000', "--backbones=('checkpoint','random')", '--steps=100'],
    }
    few = {
        'train_tokenizer.py': ['--steps=2', '--data=demo:64', '--workers=0'],
        'pictures.py': ['--data=demo:8'],
        'pretrain.py': ['--steps=2', '--data=demo:64', '--workers=0'],
        'evaluate.py': ['--steps=2', '--data=demo:48', '--batch_size=16', '--workers=0'],
    }
    text = (HERE / 'README.md').read_text() + (HERE / 'docs' / 'results.md').read_text().replace(
        '$S', '1'
    )
    commands = [
        shlex.split(line.split('#')[0])
        for line in text.splitlines()
        if line.startswith('    python ')
        # not the sets we have not here
        and not any(s in line for s in ('/data/', '$D', 'plot.py'))
    ]
    # the quick start
    assert [c[1] for c in commands[:3]] == ['train_tokenizer.py', 'pretrain.py', 'evaluate.py']
    for i, cmd in enumerate(commands):
        script, flags = cmd[1], [f.replace('CKPT', 'out/pretrain/ckpt.pt') for f in cmd[2:]]
        # the quick start, and its stages again
        quick = i < 3 or not flags and script != 'evaluate.py'
        fp32 = ['--dtype=fp32'] if script != 'pictures.py' else []  # pictures compute in fp32
        run_script(script, *flags, *(learn[script] if quick else few[script]), *fp32, cwd=tmp_path)
        if i == 2:
            res = json.loads(
                (tmp_path / 'out' / 'eval' / 'compare' / 'result.json').read_text().splitlines()[-1]
            )
            for probe in ('k-NN', 'linear probe'):
                assert res[f'{probe} pretrained'] >= res[f'{probe} random init'] + 17, res
    # the README's Python, as it stands, on the files the quick start wrote
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(
        '\n'.join(re.findall(r'```python\n(.*?)```', (HERE / 'README.md').read_text(), re.S)), scope
    )
    assert scope['codes'].shape == (2, 64) and torch.isfinite(scope['losses']['loss'])
    assert scope['feats'].shape == (2, 96)


def test_every_name_of_the_readmes_paper_to_code_table_exists():
    section = (HERE / 'README.md').read_text().split('## From the paper to the code')[1]
    table = [line for line in section.split('##')[0].splitlines() if line.startswith('|')]
    names = re.findall(r'`(\w+(?:\.\w+)+)`', '\n'.join(table))
    assert len(names) > 25
    for name in names:
        module, *attrs = name.split('.')
        obj = __import__(module)
        for attr in attrs:
            assert hasattr(obj, attr), name
            obj = getattr(obj, attr)


# ----------------------------------- evaluate.py: probes, compare, fine-tuning


def test_knn_on_separable_features_is_exact():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 16), dim=1) * 10
    train_y = torch.arange(4).repeat_interleave(30)
    train_f = centres[train_y] + torch.randn(120, 16) * 0.1
    test_y = torch.arange(4).repeat(5)
    test_f = centres[test_y] + torch.randn(20, 16) * 0.1
    acc = E.topk_acc(E.knn_classify(train_f, train_y, test_f, k=20, t=0.07), test_y, ks=(1,))
    assert acc['top1'] == 100.0
    votes = E.knn_classify(train_f, train_y, test_f, k=20, t=1e-4)  # exp(1 / 1e-4) alone overflows
    assert votes.isfinite().all() and (votes.argmax(1) == test_y).all()


def test_lars_linear_head_learns_separable_features():
    torch.manual_seed(0)
    centres = torch.randn(5, 96) * 0.5
    y = torch.randint(0, 5, (4000,))
    x = centres[y] + torch.randn(4000, 96)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(96, affine=False), torch.nn.Linear(96, 5))
    torch.nn.init.normal_(head[1].weight, std=0.01)
    opt = E.LARS(head.parameters(), lr=4.0)
    for _ in range(300):
        i = torch.randint(0, 4000, (64,))
        loss = F.cross_entropy(head(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (head.eval()(x).argmax(1) == y).float().mean() > 0.95


@pytest.mark.slow
@pytest.mark.parametrize(
    'mode,extra,metric',
    [
        ('linear', ['--steps=3'], 'top1'),
        ('linear', ['--steps=2', '--linear_recipe=beit', '--lr=1e-3'], 'best_block'),
        ('knn', [], 'top1'),
        ('finetune', ['--steps=3', '--lr=1e-3'], 'top1'),
        ('segment', ['--steps=2', '--seg_layers=(0,0,1,1)', '--lr=1e-3'], 'mIoU'),
    ],
)
def test_evaluate_modes_run(mode, extra, metric, pretrain_ckpt, tmp_path):
    p = run_script(
        'evaluate.py',
        f'--mode={mode}',
        f'--checkpoint={pretrain_ckpt}',
        *EVAL_TINY,
        *extra,
        f'--out_dir={tmp_path}',
    )
    res = json.loads((tmp_path / 'result.json').read_text().splitlines()[-1])
    assert metric in res, p.stdout[-1000:]
    if mode == 'finetune':  # the fine-tuned checkpoint scores again with --eval_only
        run_script(
            'evaluate.py',
            '--mode=finetune',
            '--eval_only=True',
            f'--checkpoint={tmp_path}/ckpt.pt',
            *EVAL_TINY,
            f'--out_dir={tmp_path}/again',
        )
        again = json.loads((tmp_path / 'again' / 'result.json').read_text())
        assert again['top1'] == res['top1']


def test_robust_indices_are_the_official_masks():
    """The 200 ImageNet-1k indices of ImageNet-A and -R: sorted, distinct, in range; spot checks
    against the official imagenet_a_r_indices.py (its first and last entries of each mask)."""
    for idx in (E.IMAGENET_A, E.IMAGENET_R):
        assert len(idx) == 200 and list(idx) == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 1000
    assert E.IMAGENET_A[:3] == (6, 11, 13) and E.IMAGENET_A[-1] == 988  # n01498041 (shark), ...
    assert E.IMAGENET_R[:3] == (1, 2, 4) and E.IMAGENET_R[-1] == 988


@pytest.mark.slow
def test_robust_test_restricts_logits_to_the_sets_classes(tmp_path):
    """A tiny ImageNet-A-like folder (200 class folders; class 7 holds 5 images, the others 1) and a
    1000-class model that always answers ImageNet class IMAGENET_A[7]: restricted to the 200 classes
    in folder order, it is right exactly on class 7's images: top-1 = 5 / 204."""
    for k in range(200):
        (tmp_path / 'a' / f'n{k:08d}').mkdir(parents=True)
        for j in range(5 if k == 7 else 1):
            Image.new('RGB', (16, 16), (k, j, 0)).save(tmp_path / 'a' / f'n{k:08d}' / f'{j}.png')
    torch.manual_seed(0)
    vit = beitv2.ViT(beitv2.classifier_config(tiny_beit(img_size=16).cfg, 1000))
    with torch.no_grad():
        vit.head.weight.zero_()
        vit.head.bias.zero_()
        vit.head.bias[E.IMAGENET_A[7]] = 1.0
        vit.head.bias[0] = 2.0  # the largest logit overall, but not an ImageNet-A class
    torch.save(
        {'model': vit.state_dict(), 'model_config': dataclasses.asdict(vit.cfg)}, tmp_path / 'ft.pt'
    )
    run_script(
        'evaluate.py',
        '--mode=finetune',
        '--eval_only=True',
        '--robust_test=imagenet_a',
        f'--data={tmp_path / "a"}',
        f'--checkpoint={tmp_path / "ft.pt"}',
        '--img_size=16',
        '--workers=0',
        f'--out_dir={tmp_path / "out"}',
    )
    res = json.loads((tmp_path / 'out' / 'result.json').read_text())
    assert abs(res['top1'] - 100 * 5 / 204) < 1e-4, res
    p = run_script(
        'evaluate.py',
        '--mode=finetune',
        '--robust_test=imagenet_a',
        f'--data={tmp_path / "a"}',
        f'--checkpoint={tmp_path / "ft.pt"}',
        f'--out_dir={tmp_path / "o2"}',
        ok=False,
    )
    assert p.returncode == 2 and '--eval_only=True' in p.stderr


@pytest.mark.slow
def test_eval_every_logs_each_score_and_reports_final_and_best(pretrain_ckpt, tmp_path):
    run_script(
        'evaluate.py',
        '--mode=finetune',
        f'--checkpoint={pretrain_ckpt}',
        *EVAL_TINY,
        '--steps=4',
        '--eval_every=2',
        '--lr=1e-3',
        f'--out_dir={tmp_path}',
    )
    scored = [
        json.loads(ln)
        for ln in (tmp_path / 'log.jsonl').read_text().splitlines()
        if 'val_top1' in ln
    ]
    assert [r['step'] for r in scored] == [2, 4]
    res = json.loads((tmp_path / 'result.json').read_text())
    best = max(scored, key=lambda r: r['val_top1'])  # the first of equals, as the result keeps
    assert res['top1'] == scored[-1]['val_top1']
    assert (res['best_top1'], res['best_step']) == (best['val_top1'], best['step'])
    # official checkpoint-best: the best step's weights
    kept = engine.read_checkpoint(tmp_path / 'best.pt')
    assert (kept['step'], kept['scores']['top1']) == (best['step'], best['val_top1'])
    run_script(
        'evaluate.py',
        '--mode=finetune',
        '--eval_only=True',
        f'--checkpoint={tmp_path / "best.pt"}',
        *EVAL_TINY,
        f'--out_dir={tmp_path / "again"}',
    )
    assert json.loads((tmp_path / 'again' / 'result.json').read_text())['top1'] == best['val_top1']
    # stopped after step 2 and resumed: the best of steps 1-2 comes back from the checkpoint
    cut = tmp_path / 'cut'
    args = [
        'evaluate.py',
        '--mode=finetune',
        f'--checkpoint={pretrain_ckpt}',
        *EVAL_TINY,
        '--steps=4',
        '--eval_every=1',
        '--lr=1e-3',
        f'--out_dir={cut}',
    ]
    run_script(*args, '--stop_after=2')
    first = [
        json.loads(ln) for ln in (cut / 'log.jsonl').read_text().splitlines() if 'val_top1' in ln
    ]
    best = engine.read_checkpoint(cut / 'best.pt')['scores']
    assert best['top1'] == max(r['val_top1'] for r in first)
    run_script(*args)
    scored = [
        json.loads(ln) for ln in (cut / 'log.jsonl').read_text().splitlines() if 'val_top1' in ln
    ]
    res = json.loads((cut / 'result.json').read_text().splitlines()[-1])  # after step 2's line
    assert [r['step'] for r in scored] == [1, 2, 3, 4]
    assert res['best_top1'] == max(r['val_top1'] for r in scored)


@pytest.mark.slow
def test_21k_presets_train_without_a_val_split(pretrain_ckpt, tmp_path):
    """ImageNet-21k has no val split: finetune_21k_* train and checkpoint without one (official
    --disable_eval_during_finetuning)."""
    run_script(
        'evaluate.py',
        '--preset=finetune_21k_base',
        f'--data={image_folder(tmp_path / "d")}',
        f'--checkpoint={pretrain_ckpt}',
        '--img_size=16',
        '--batch_size=4',
        '--accum=1',
        '--epochs=2',
        '--warmup_epochs=1',
        '--workers=0',
        '--log_every=1',
        f'--out_dir={tmp_path / "out"}',
    )
    assert engine.read_checkpoint(tmp_path / 'out' / 'ckpt.pt')['step'] == 6
    assert json.loads((tmp_path / 'out' / 'result.json').read_text())['step'] == 6
    assert not (tmp_path / 'out' / 'best.pt').exists()


@pytest.mark.slow
def test_compare_sets_three_backbones_side_by_side(pretrain_ckpt, tmp_path):
    p = run_script(
        'evaluate.py',
        f'--checkpoint={pretrain_ckpt}',
        *EVAL_TINY,
        '--steps=2',
        '--seeds=2',
        f'--out_dir={tmp_path}',
    )
    rows = [json.loads(line) for line in (tmp_path / 'result.json').read_text().splitlines()]
    runs = [(r['backbone'], r['probe'], r['seed']) for r in rows if r['mode'] == 'compare_run']
    assert sorted(runs) == sorted(
        [
            (b, 'linear probe', s)
            for b in ('pretrained', 'random init', 'raw pixels')
            for s in (0, 1)
        ]
        + [
            ('pretrained', 'k-NN', 0),
            ('random init', 'k-NN', 0),
            ('random init', 'k-NN', 1),
            ('raw pixels', 'k-NN', 0),
        ]
    )
    assert rows[-1]['mode'] == 'compare' and len(rows[-1]) > 6
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith('top-1 % (chance 20.0), mean of 2 seed(s): linear probe: pretrained')
    assert 'raw pixels' in last
    mean = (
        sum(r['top1'] for r in rows[:-1] if r['backbone'] == 'random init' and r['probe'] == 'k-NN')
        / 2
    )
    assert rows[-1]['k-NN random init'] == pytest.approx(mean)


def fashion_mnist(tmp_path):
    """ROOT for --data=fashion_mnist:ROOT: $BEITV2_FASHION_MNIST, or Debian's dataset-fashion-mnist
    files un-gzipped into torchvision's layout; skips the test where neither is there."""

    if os.environ.get('BEITV2_FASHION_MNIST'):
        return os.environ['BEITV2_FASHION_MNIST']
    src = Path('/usr/share/datasets/fashion-mnist')
    if not (src / 'train-images-idx3-ubyte.gz').exists():
        pytest.skip(
            'no Fashion-MNIST here (apt-get install dataset-fashion-mnist, or '
            'BEITV2_FASHION_MNIST=ROOT)'
        )
    raw = tmp_path / 'fmnist' / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for f in src.glob('*.gz'):
        (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    return str(tmp_path / 'fmnist')


@pytest.mark.slow
def test_real_images_fashion_mnist_path(tmp_path):
    """The Fashion-MNIST presets end to end on the real images, shortened: each stage runs, and
    fine-tuning the pretrained backbone for 60 steps scores the 10,000 test images above chance."""
    d = f'--data=fashion_mnist:{fashion_mnist(tmp_path)}'
    run_script(
        'train_tokenizer.py',
        '--preset=fmnist',
        d,
        '--steps=20',
        '--workers=0',
        f'--out_dir={tmp_path / "t"}',
    )
    run_script(
        'pretrain.py',
        '--preset=fmnist',
        d,
        '--steps=20',
        '--warmup_steps=5',
        '--workers=0',
        f'--tokenizer={tmp_path / "t" / "ckpt.pt"}',
        f'--out_dir={tmp_path / "p"}',
    )
    run_script(
        'evaluate.py',
        '--preset=fmnist_finetune',
        d,
        '--steps=60',
        '--warmup_steps=10',
        '--eval_every=30',
        '--workers=0',
        f'--checkpoint={tmp_path / "p" / "ckpt.pt"}',
        f'--out_dir={tmp_path / "f"}',
    )
    scored = [
        json.loads(ln)
        for ln in (tmp_path / 'f' / 'log.jsonl').read_text().splitlines()
        if 'val_top1' in ln
    ]
    # chance 10; 21.8 measured
    assert [r['step'] for r in scored] == [30, 60] and scored[-1]['val_top1'] > 15, scored


@pytest.mark.slow
def test_torchrun_knn_equals_one_process(pretrain_ckpt, tmp_path):
    args = [
        'evaluate.py',
        '--mode=knn',
        f'--checkpoint={pretrain_ckpt}',
        *EVAL_TINY[:-1],
        '--data=demo:50',
    ]
    run_script(*args, f'--out_dir={tmp_path / "one"}')
    p = subprocess.run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node=2',
            '--standalone',
            *args,
            f'--out_dir={tmp_path / "two"}',
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / 'result.json').read_text()) for d in ('one', 'two'))
    assert one['top1'] == two['top1'] and one['top5'] == two['top5']


# --------------------------------------------------- evaluate.py: segmentation


def test_miou_against_hand_computed_confusion():
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    target = torch.tensor([0, 1, 1, 1, 2, 255, 0, 0])
    conf = upernet.confusion(pred, target, 3)
    assert conf.tolist() == [[2, 0, 1], [1, 2, 0], [0, 0, 1]]  # rows: target, columns: prediction
    # IoU: class 0: 2 / (3 + 3 - 2), class 1: 2 / (3 + 2 - 2), class 2: 1 / (1 + 2 - 1)
    assert abs(upernet.seg_scores(conf)['mIoU'] - 100 * (2 / 4 + 2 / 3 + 1 / 2) / 3) < 1e-9
    # mmseg: mAcc over classes of diag / target pixels, aAcc over all pixels
    s = upernet.seg_scores(conf)
    assert (
        abs(s['mAcc'] - 100 * (2 / 3 + 2 / 3 + 1 / 1) / 3) < 1e-9
        and abs(s['aAcc'] - 100 * 5 / 7) < 1e-9
    )


def tiny_segmenter():
    torch.manual_seed(0)
    vit = beitv2.ViT(
        beitv2.ViTConfig(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=4,
            num_heads=2,
            rel_pos='per_block',
            fc_norm=True,
        )
    )
    return upernet.Segmenter(vit, (0, 1, 2, 3), num_classes=3, channels=16).eval()


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    m = tiny_segmenter()
    img = torch.randn(3, 32, 32)
    with torch.no_grad():
        whole = m(img[None])[0][0]
        close(upernet.sliding_window(m, [img], 3, crop=32, stride=21, batch=1)[0], whole, atol=1e-6)
        # overlapping windows, padding
        images = [torch.randn(3, 40, 48), img, torch.randn(3, 24, 70)]
        each = [upernet.sliding_window(m, [im], 3, crop=32, stride=21, batch=1)[0] for im in images]
        # 4 + 1 + 3 windows, 3 by 3
        together = upernet.sliding_window(m, images, 3, crop=32, stride=21, batch=3)
    assert [t.shape[1:] for t in together] == [im.shape[1:] for im in images]
    for a, b in zip(each, together):
        close(a, b, atol=1e-5)


def test_segmenter_shapes_and_gradients():
    m = tiny_segmenter().train()
    logits, aux = m(torch.randn(2, 3, 32, 32))
    assert logits.shape == aux.shape == (2, 3, 32, 32)
    (logits.mean() + aux.mean()).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_segmentation_loss_counts_ignored_pixels_as_zero():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, :2] = 255
    per_pixel = -logits.log_softmax(1).gather(1, target.clamp(max=2)[:, None])[:, 0]
    # mmseg 0.x: / all pixels
    expected = per_pixel.masked_fill(target == 255, 0).sum() / target.numel()
    close(upernet.seg_loss(logits, target), expected, atol=1e-6)


def test_segmenter_heads_have_mmseg_init_and_cls_token_is_decayed():
    torch.manual_seed(0)
    m = tiny_segmenter()
    seg = m.decode_head.conv_seg.weight
    assert abs(seg.std().item() - 0.01) < 0.003 and not m.decode_head.conv_seg.bias.any()
    # kaiming normal, fan_out = out_channels * k * k
    conv = m.decode_head.fpn_bottleneck.conv.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert abs(conv.std().item() / math.sqrt(2 / fan_out) - 1) < 0.1
    groups = engine.param_groups(m, 0.05, 0.9, m.backbone.cfg.depth, no_decay=())
    decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    # as the official mmseg run (its name test misses the prefix)
    assert id(m.backbone.cls_token) in decayed
    assert id(m.backbone.cls_token) not in {
        id(p) for g in engine.param_groups(m, 0.05) if g['weight_decay'] > 0 for p in g['params']
    }


UPERNET_LAYOUTS = HERE / 'testdata' / 'official_upernet_layouts.json'


@pytest.mark.parametrize('name', ['base', pytest.param('large', marks=pytest.mark.slow)])
def test_released_upernet_layout_loads_strictly(name):
    """The released ADE20K UperNet files (mmseg state_dict: backbone.* with fpn1/fpn2,
    decode_head.*, auxiliary_head.*; testdata/official_upernet_layouts.json) load into our Segmenter
    key for key."""
    lay = json.loads(UPERNET_LAYOUTS.read_text())['layouts'][f'upernet_beit_{name}']
    sd = {k: torch.zeros(s, dtype=getattr(torch, d)) for k, (s, d) in lay.items()}
    for k in sd:
        if k.endswith('relative_position_index'):
            sd[k] = beitv2.relative_position_index(32, 32)
    for i, k in enumerate(
        (
            'backbone.fpn2.0.weight',
            'decode_head.psp_modules.3.1.bn.running_var',
            'auxiliary_head.conv_seg.bias',
            'backbone.blocks.5.mlp.fc1.bias',
        )
    ):
        sd[k].fill_(i + 1)
    args = [f'--preset=segment_{name}', '--data=x', '--checkpoint=x']
    cfg = settings.configure(E.Config(), E.PRESETS, args)
    m = E.trained_segmenter(cfg, {'state_dict': sd})
    size = (m.backbone.cfg.embed_dim, m.backbone.cfg.depth, m.backbone.cfg.img_size)
    assert size == ((768, 12, 512) if name == 'base' else (1024, 24, 512))
    own = m.state_dict()
    assert (own['fpn2.0.weight'] == 1).all()
    assert (own['decode_head.psp_modules.3.1.bn.running_var'] == 2).all()
    assert (own['auxiliary_head.conv_seg.bias'] == 3).all()
    assert (own['backbone.blocks.5.mlp.fc1.bias'] == 4).all()
    theirs = {k for k in lay if not k.endswith('relative_position_index')}
    ours = {('backbone.' + k if k.startswith(('fpn1.', 'fpn2.')) else k) for k in own}
    assert ours == theirs


@pytest.mark.slow
def test_segment_eval_only_scores_an_mmseg_file(tmp_path):
    """A segmenter saved in mmseg's layout (the official backbone names, fpn1/fpn2 inside it, as the
    released files) scores with --mode=segment --eval_only=True exactly as the model itself does."""
    torch.manual_seed(0)
    vit = beitv2.ViT(
        beitv2.ViTConfig(
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=4,
            num_heads=1,
            rel_pos='per_block',
            fc_norm=True,
            layer_scale=0.1,
        )
    )
    m = upernet.Segmenter(
        vit, (0, 1, 2, 3), num_classes=len(data.DemoTextures.classes) + 1, channels=16
    )
    for p in m.decode_head.conv_seg.parameters():
        p.data.normal_()  # a head that says something
    sd = {
        ('backbone.' + k if k.startswith(('fpn1.', 'fpn2.')) else k): v
        for k, v in m.state_dict().items()
    }
    sd.update({'backbone.' + k: v for k, v in beitv2.export_state(m.backbone).items()})
    torch.save({'meta': {'CLASSES': ['a', 'b']}, 'state_dict': sd}, tmp_path / 'upernet.pth')
    args = [
        '--mode=segment',
        '--eval_only=True',
        f'--checkpoint={tmp_path / "upernet.pth"}',
        '--img_size=32',
        '--seg_layers=(0,1,2,3)',
        '--workers=0',
        '--data=demo:48',
    ]
    run_script('evaluate.py', *args, f'--out_dir={tmp_path / "out"}')
    res = json.loads((tmp_path / 'out' / 'result.json').read_text())
    cfg = settings.configure(E.Config(), E.PRESETS, args)
    env = engine.Env()
    want = E.segment_score(m.eval(), data.SegData('demo:48', 'val', 32), cfg, env)
    assert set(want) == {'mIoU', 'mAcc', 'aAcc'} and 0 < want['mIoU'] < 100
    assert {k: res[k] for k in want} == pytest.approx(want, abs=1e-6)


def test_a_label_means_the_same_class_in_every_split(tmp_path):
    """val/ without one of train/'s classes keeps train's indices (k-NN would score 50 instead of
    100 otherwise); a class that train/ lacks is refused, named."""

    root = image_folder(tmp_path / 'd', classes=3, per_class=2, splits=('train', 'val'))
    shutil.rmtree(root / 'val' / 'c0')
    val = data.build_dataset(str(root), 'val', 16)
    assert val.classes == ['c0', 'c1', 'c2'] and sorted(set(val.targets)) == [1, 2]
    assert [val.classes[y] for _, y in val.samples] == [p.split(os.sep)[-2] for p, _ in val.samples]
    (root / 'val' / 'c9').mkdir()
    (root / 'val' / 'c1' / '0.png').rename(root / 'val' / 'c9' / '0.png')
    with pytest.raises(SystemExit):
        data.build_dataset(str(root), 'val', 16)


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    for sub in ('training', 'validation'):
        (tmp_path / 'images' / sub).mkdir(parents=True)
        (tmp_path / 'annotations' / sub).mkdir(parents=True)
        Image.new('RGB', (40, 30), (10, 20, 30)).save(tmp_path / 'images' / sub / 'ADE_1.jpg')
        mask = torch.zeros(30, 40, dtype=torch.uint8)
        mask[:, 20:] = 150  # class 150 -> 149; 0 ("other") -> ignore
        Image.fromarray(mask.numpy()).save(tmp_path / 'annotations' / sub / 'ADE_1.png')
    ds = data.SegData(f'ade20k:{tmp_path}', 'train', 32)
    img, mask = ds[0]
    assert ds.num_classes == 150 and set(mask.unique().tolist()) == {149, 255}
    x, y = data.SegTransform(32, train=True)((img, mask), random.Random(0))
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and set(y.unique().tolist()) <= {149, 255}


class Scripted:  # an rng whose randint / uniform / random answers are given in order
    def __init__(self, randint=(), uniform=(), random=()):
        self.ints, self.floats, self.unit = list(randint), list(uniform), list(random)

    def randint(self, a, b):
        v = self.ints.pop(0)
        assert a <= v <= b
        return v

    def uniform(self, a, b):
        return self.floats.pop(0)

    def random(self):
        return self.unit.pop(0)


def test_segmentation_resize_fits_mmsegs_scale():
    def fit(h, w):
        return tuple(
            data.SegTransform(512, False)
            .resize(torch.zeros(3, h, w), torch.zeros(h, w))[0]
            .shape[1:]
        )

    # the short side reaches 512; the long caps
    assert fit(400, 600) == (512, 768) and fit(100, 1000) == (205, 2048)
    t = data.SegTransform(32, train=False)
    img, mask = t((Image.new('RGB', (30, 20)), torch.zeros(20, 30, dtype=torch.long)), None)
    assert img.shape == (3, 32, 48) and mask.shape == (20, 30)  # scored at the original size


def test_segmentation_crop_redraws_while_one_class_dominates():
    """cat_max_ratio 0.75: crops where one class holds >= 75% of the labelled pixels are drawn
    again (up to 10 draws in all); ignored pixels (255) do not count."""
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[32:, 32:] = torch.arange(2).repeat(32, 16)  # classes 0 and 1 in alternate columns
    mask[:32, :32] = 255
    t = data.SegTransform(32, train=True)
    # (0, 32) and (32, 0) are all class 0; (0, 0) is all ignored; (32, 32) is half 0, half 1
    assert t.crop_box(mask, Scripted(randint=[0, 32, 32, 0, 0, 0, 32, 32, 0, 0])) == (32, 32)
    # 10 draws, none good: the last
    assert t.crop_box(mask, Scripted(randint=[0, 32] * 10)) == (0, 32)


def test_photometric_distortion_steps_follow_mmseg():
    # red, grey; (3, 1, 2)
    img = torch.tensor([[[250, 10]], [[0, 10]], [[0, 10]]], dtype=torch.uint8)
    # brightness only (+20; the red channel clips at 255, uint8 truncation)
    out = data.photometric_distortion(img, Scripted(randint=[1, 0, 0, 0, 0, 0], uniform=[20.5]))
    assert out[:, 0, 0].tolist() == [255, 20, 20] and out[:, 0, 1].tolist() == [30, 30, 30]
    # contrast first (x 1.5), then nothing else
    out = data.photometric_distortion(img, Scripted(randint=[0, 1, 1, 0, 0], uniform=[1.5]))
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 1].tolist() == [15, 15, 15]
    # saturation x 0.5 keeps hue and value: red (S 1) -> S 0.5; grey stays grey
    out = data.photometric_distortion(img, Scripted(randint=[0, 0, 1, 0, 0], uniform=[0.5]))
    assert out[:, 0, 0].tolist() == [250, 125, 125] and out[:, 0, 1].tolist() == [10, 10, 10]


def test_segmentation_train_pads_bottom_right_after_normalising():
    t = data.SegTransform(32, train=True)
    mask = torch.ones(20, 24, dtype=torch.long)
    mask[:, 12:] = 2
    pil = Image.new('RGB', (24, 20), (200, 200, 200))
    # ratio 0.5: fit (64, 16) -> 16 x 19; crop (0, 0) (two classes: kept); no flip; no distortion
    x, y = t((pil, mask), Scripted(randint=[0] * 7, uniform=[0.5], random=[0.9]))
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert (y[16:] == 255).all() and (y[:, 19:] == 255).all() and (y[:16, :19] != 255).all()
    # 0 after normalising: the mean colour
    assert (x[:, 16:] == 0).all() and (x[:, :, 19:] == 0).all()
    grey = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 0, 0], grey)


# -------------------------- evaluate.py: attention, codebook and code pictures


def tiny_pretrain_file(path, table_row=None):
    """A random tiny BEiTv2 saved as our pretraining checkpoint (16 px, patch 4: a 4x4 grid);
    table_row: a relative-offset row of the shared table set to +50 in every head."""
    torch.manual_seed(0)
    cfg = beitv2.BEiTConfig(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, vocab_size=16, early_layers=1
    )
    model = beitv2.BEiTv2(cfg)
    if table_row is not None:
        with torch.no_grad():
            model.rel_pos_bias.relative_position_bias_table[table_row] = 50.0

    torch.save(dict(model=model.state_dict(), model_config=asdict(cfg)), path)
    return model


def test_evaluate_takes_the_size_the_checkpoint_was_trained_at(tmp_path):
    tiny_pretrain_file(tmp_path / 'p.pt')  # 16 px, where evaluate's default is 32
    args = [
        '--mode=linear',
        f'--checkpoint={tmp_path / "p.pt"}',
        '--steps=1',
        '--batch_size=8',
        '--workers=0',
        '--data=demo:48',
    ]
    p = run_script('evaluate.py', *args, f'--out_dir={tmp_path / "o"}')
    assert 'img_size=16' in p.stdout
    p = run_script('evaluate.py', *args, '--img_size=24', f'--out_dir={tmp_path / "o24"}')
    assert 'img_size=24' in p.stdout  # given: it wins (the tables are resized)


def test_compare_checks_every_backbone_before_its_first_probe(tmp_path):
    model = tiny_pretrain_file(tmp_path / 'p.pt')
    # no saved config: random cannot be built
    torch.save(dict(model=model.state_dict()), tmp_path / 'official.pt')
    p = run_script(
        'evaluate.py',
        f'--checkpoint={tmp_path / "official.pt"}',
        '--img_size=16',
        '--data=demo:48',
        '--workers=0',
        f'--out_dir={tmp_path / "o"}',
        ok=False,
    )
    assert 'needs one of our pretraining checkpoints' in p.stderr and 'top-1' not in p.stdout


def test_long_phases_show_progress(tmp_path, monkeypatch):
    tiny_pretrain_file(tmp_path / 'p.pt')
    monkeypatch.setattr(engine, 'PROGRESS_EVERY', 0.0)  # a line every batch, not every 10 s
    p = run_script(
        'evaluate.py',
        f'--checkpoint={tmp_path / "p.pt"}',
        '--steps=3',
        *EVAL_TINY,
        "--backbones=('random',)",
        f'--out_dir={tmp_path / "o"}',
    )
    lines = p.stdout.splitlines()
    assert lines[0].startswith(
        'compare on demo:48 at 16 px: random init, each by a linear probe (3 steps)'
    )
    for shown in (
        'step 3/3 | loss',
        '  scoring the val split, batches: 1/6',
        '  k-NN train, batches: 5/6',
        '  k-NN val, batches: 1/6',
    ):
        assert shown in p.stdout, shown


def test_attention_probs_are_the_blocks_softmax(tmp_path):
    model = tiny_pretrain_file(tmp_path / 'p.pt').eval()
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    x = torch.randn(2, 3, 16, 16)
    for layer in (0, 1):
        probs = pictures.attention_probs(model, x, layer)  # (2, nh, 17, 17)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 17), atol=1e-6)
        blk = model.blocks[layer]
        inp = (
            model.with_cls(model.patches(x))
            if layer == 0
            else model.forward_tokens(x, layers=(0,))[1][0]
        )
        y = blk.norm1(inp)
        v = (y @ blk.attn.qkv.weight[64:].t() + blk.attn.v_bias).view(2, 17, 2, 16).transpose(1, 2)
        mixed = (probs @ v).transpose(1, 2).reshape(2, 17, 32)
        with torch.no_grad():
            assert torch.allclose(
                blk.attn.proj(mixed), blk.attn(y, model.shared_pos_bias()), atol=1e-5
            )


def test_attention_picture_lights_the_forced_key(tmp_path):
    """A bias of +50 on the offset (query - key) = (-1, +1) makes patch (1, 1) attend to (2, 0)."""
    row = (-1 + 3) * 7 + (1 + 3)  # (dy + h - 1) * (2w - 1) + dx + w - 1 on the 4x4 grid
    tiny_pretrain_file(tmp_path / 'p.pt', table_row=row)
    res = pictures.main(
        [
            '--mode=attention',
            f'--checkpoint={tmp_path / "p.pt"}',
            '--img_size=16',
            '--query=1,1',
            '--data=demo:8',
            f'--out_dir={tmp_path}',
        ]
    )
    assert res['peak'] == '2,0 2,0' and res['heads'] == 2
    # image + 2 heads, 16 px enlarged to 256, 2 px padding; a title above
    png = Image.open(res['png'])
    assert (
        png.size[0] == 2 + 3 * (256 + 2) and png.size[1] > 260 and 'heads 1-2' in png.text['Title']
    )
    res = pictures.main(
        [
            '--mode=attention',
            f'--checkpoint={tmp_path / "p.pt"}',
            '--img_size=32',
            '--layer=0',
            '--data=demo:8',
            f'--out_dir={tmp_path}',
        ]
    )  # 8x8 grid: tables resized
    assert res['query'] == 'cls' and Image.open(res['png']).size[0] == 2 + 3 * (256 + 2)


def test_attention_at_a_size_that_is_not_a_multiple_of_8(tmp_path):
    tiny_pretrain_file(tmp_path / 'p.pt')  # patch 4
    res = pictures.main(
        [
            '--mode=attention',
            f'--checkpoint={tmp_path / "p.pt"}',
            '--img_size=36',
            '--query=8,8',
            '--data=demo:8',
            f'--out_dir={tmp_path}',
        ]
    )
    assert res['heads'] == 2


@pytest.mark.slow
def test_evaluate_codebook_png_and_errors(tokenizer_ckpt, pretrain_ckpt, tmp_path):
    run_script(
        'pictures.py',
        '--mode=codebook',
        f'--checkpoint={tokenizer_ckpt}',
        '--img_size=16',
        '--data=demo',
        f'--out_dir={tmp_path}',
    )
    assert Image.open(tmp_path / 'codebook.png').size[0] > 16 * 32
    assert 'token map' in Image.open(tmp_path / 'token_maps.png').text['Title']
    p = run_script(
        'evaluate.py', '--mode=linear', f'--checkpoint={tokenizer_ckpt}', *EVAL_TINY, ok=False
    )
    assert 'a tokenizer, not a backbone' in p.stderr and 'Traceback' not in p.stderr
    p = run_script(
        'evaluate.py',
        '--mode=segment',
        f'--checkpoint={pretrain_ckpt}',
        '--data=ade20k:/nonexistent',
        *EVAL_TINY[:-1],
        ok=False,
    )
    assert 'ADE20K' in p.stderr and 'Traceback' not in p.stderr
    p = run_script(
        'evaluate.py',
        '--mode=finetune',
        '--eval_only=True',
        f'--checkpoint={pretrain_ckpt}',
        *EVAL_TINY,
        ok=False,
    )
    assert 'class head' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.slow
def test_codes_picture_equals_encode(tokenizer_ckpt, tmp_path):
    img = Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy())
    img.save(tmp_path / 'x.png')
    p = run_script(
        'pictures.py',
        '--mode=codes',
        f'--checkpoint={tokenizer_ckpt}',
        f'--image={tmp_path / "x.png"}',
        f'--out_dir={tmp_path}',
    )
    grid = [[int(c) for c in line.split()] for line in p.stdout.splitlines()[:4]]
    tok = beitv2.load_tokenizer(tokenizer_ckpt)
    x = data.eval_transform(16, normalized=False)(data.load_image(tmp_path / 'x.png'))[None]
    assert torch.equal(torch.tensor(grid).flatten(), tok.encode(x)[0])
    png = Image.open(tmp_path / 'codes.png')
    assert png.size[0] == 2 + 2 * (256 + 2) and 'x.png and its codes' in png.text['Title']
    p = run_script(
        'pictures.py',
        '--mode=codes',
        f'--checkpoint={tokenizer_ckpt}',
        '--image=/nonexistent.png',
        ok=False,
    )
    assert 'No such file' in p.stderr and 'Traceback' not in p.stderr


# ------------------------------------------------------- plot.py and README.md


# ----------------------------------------- what users ask for: data, labels, health, clusters


def test_a_folder_without_labels_is_every_image_at_any_depth(tmp_path):
    """Stages 1 and 2 take a folder of images with no class folders: flat or nested, any extension
    PIL opens, in any case; notes beside them are left out. Stage 3 needs labels and says which
    layout."""
    flat, nested = tmp_path / 'flat', tmp_path / 'nested' / 'a' / 'b'
    nested.mkdir(parents=True)
    flat.mkdir()
    for i, name in enumerate(['x.png', 'y.JPEG', 'z.Jpg', 'w.gif', 'v.webp', 'u.BMP']):
        Image.new('RGB', (20, 20), (40 * i, 0, 0)).save(flat / name)
        Image.new('RGB', (20, 20), (0, 40 * i, 0)).save(nested / name)
    (flat / 'notes.txt').write_text('not an image')
    for root in (flat, tmp_path / 'nested'):
        ds = data.build_dataset(str(root), 'train', 16, labels=False)
        assert len(ds) == 6 and ds[5][0].size == (20, 20) and ds[5][1] == 0
    assert data.build_dataset(str(flat), 'val', 16, labels=False) is None  # no val split
    # a corrupt file: one line when it is read, as in a class folder
    (flat / 'bad.png').write_bytes(b'')
    with pytest.raises(settings.BadInput, match='unreadable image .*bad.png'):
        [data.build_dataset(str(flat), 'train', 16, labels=False)[i] for i in range(7)]


@pytest.mark.slow
def test_stages_1_and_2_train_on_a_folder_without_labels(tmp_path):
    root = tmp_path / 'photos'
    for i in range(16):
        folder = root / f'day{i % 3}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((24, 20, 3)) * 255).astype(np.uint8)).save(
            folder / f'{i}.jpg'
        )
    run_script(
        'train_tokenizer.py',
        *TINY_TOK,
        '--steps=2',
        '--workers=0',
        f'--data={root}',
        f'--out_dir={tmp_path / "tok"}',
    )
    p = run_script(
        'pretrain.py',
        *TINY_PRE,
        '--steps=2',
        '--workers=0',
        f'--data={root}',
        f'--tokenizer={tmp_path / "tok" / "ckpt.pt"}',
        f'--out_dir={tmp_path / "pre"}',
    )
    assert 'step 2/2' in p.stdout


def test_low_label_runs_draw_each_class_alike_from_the_seed():
    ds = data.build_dataset('demo:400', 'train', 16)
    targets = torch.tensor(ds.targets)
    for labels, per_class in (('10%', lambda n: round(n / 10)), ('3', lambda n: 3)):
        sub = data.labelled(ds, labels, seed=0)
        got = torch.tensor([ds.targets[i] for i in sub.indices])
        for c in range(5):
            assert (got == c).sum() == per_class(int((targets == c).sum()))
        assert sub.classes == ds.classes
        assert sub.indices == data.labelled(ds, labels, seed=0).indices  # from the seed
        assert sub.indices != data.labelled(ds, labels, seed=1).indices
    assert data.labelled(ds, 'all', 0) is ds


@pytest.mark.slow
def test_a_low_label_run_is_saved_and_checked_on_resume(pretrain_ckpt, tmp_path):
    args = [
        '--mode=finetune',
        f'--checkpoint={pretrain_ckpt}',
        *EVAL_TINY,
        '--steps=2',
        '--lr=1e-3',
        '--labels=2',
        f'--out_dir={tmp_path}',
    ]
    p = run_script('evaluate.py', *args)
    assert 'labels: 10 training images, 2 of each class' in p.stdout
    assert engine.read_checkpoint(tmp_path / 'ckpt.pt')['config']['labels'] == '2'
    p = run_script('evaluate.py', *args[:-2], '--labels=20%', f'--out_dir={tmp_path}', ok=False)
    assert "--labels is '20%' but" in p.stderr and p.stderr.count('\n') == 1


@pytest.mark.slow
def test_each_log_line_says_how_long_the_step_waited_for_data(
    tokenizer_ckpt, tmp_path, monkeypatch
):
    """The share of the interval spent waiting for the next batch, measured on the host; a large one
    is named, with --workers. A loader made slow on purpose waits most of the time."""
    args = [*TINY_PRE, f'--tokenizer={tokenizer_ckpt}', '--steps=4', '--log_every=2', '--workers=0']
    p = run_script('pretrain.py', *args, f'--out_dir={tmp_path / "a"}')
    shares = [r['data_wait'] for r in engine.read_log(tmp_path / 'a' / 'log.jsonl')]
    assert len(shares) == 2 and all(0 < s < 1 for s in shares)
    slow = data.Crops.__call__

    def crops_slowly(self, item, rng):
        time.sleep(0.05)
        return slow(self, item, rng)

    monkeypatch.setattr(data.Crops, '__call__', crops_slowly)
    p = run_script('pretrain.py', *args, f'--out_dir={tmp_path / "b"}')
    assert 'of the time went to waiting for batches: more --workers (now 0) may help' in p.stdout


@pytest.mark.slow
def test_the_tokenizer_report_tells_a_collapsed_codebook_from_a_healthy_one(
    tokenizer_ckpt, tmp_path
):
    """--report on a tokenizer file: codes used, share, perplexity, cosine to the teacher and a
    picture. A codebook whose codes are all equal gives every patch code 0: one code used,
    flagged."""
    args = ['--img_size=16', '--batch_size=8', '--workers=0', '--data=demo:64']
    healthy = run_script(
        'train_tokenizer.py', *args, f'--report={tokenizer_ckpt}', f'--out_dir={tmp_path / "h"}'
    )
    ckpt = engine.read_checkpoint(tokenizer_ckpt)
    ckpt['model']['quantize.weight'][:] = ckpt['model']['quantize.weight'][0]
    torch.save(ckpt, tmp_path / 'collapsed.pt')
    collapsed = run_script(
        'train_tokenizer.py',
        *args,
        f'--report={tmp_path / "collapsed.pt"}',
        f'--out_dir={tmp_path / "c"}',
    )
    assert (
        'report on demo:64 val (64 images): 1 of 32 codes used (3%), perplexity 1.0'
        in collapsed.stdout
        and 'the codebook has collapsed' in collapsed.stdout
    )
    used = int(re.search(r'(\d+) of 32 codes used', healthy.stdout)[1])
    assert used > 8 and 'collapsed' not in healthy.stdout
    for out in ('h', 'c'):
        png = Image.open(tmp_path / out / 'code_usage.png')
        assert 'how often each of its 32 codes is used' in png.info['Title']
    # the bars: a full width of them for the healthy codebook, one for the collapsed
    bars = [
        np.asarray(Image.open(tmp_path / out / 'code_usage.png'))[-20, 2:-2, 0] < 128
        for out in ('h', 'c')
    ]
    assert bars[0].sum() > 4 * bars[1].sum()


@pytest.mark.slow
def test_a_collapsing_codebook_is_said_during_training(tmp_path):
    p = run_script(
        'train_tokenizer.py',
        *TINY_TOK,
        '--steps=3',
        '--workers=0',
        '--warmup_steps=0',
        '--min_code_use=0.99',
        f'--out_dir={tmp_path}',
    )
    assert 'codes used since the last log line, under --min_code_use=0.99' in p.stdout


def test_the_plan_says_when_the_lr_never_reaches_its_peak(capsys):
    optimizer = types.SimpleNamespace(param_groups=[dict(lr_scale=1.0)], defaults=dict(lr=1e-3))
    env = types.SimpleNamespace(world=1, device='cpu', dtype='fp32', print=print)
    for args, note in (([], False), (['--steps=4', '--warmup_steps=50'], True)):
        cfg = settings.configure(pretrain.Config(), pretrain.PRESETS, args)
        engine.plan(cfg, env, [None] * 10, optimizer)
        out = capsys.readouterr().out
        assert (
            'note: 4 steps of a 50-step warmup: the lr stops at 6e-05, below its peak' in out
        ) == note
    cfg = settings.configure(pretrain.Config(), pretrain.PRESETS, ['--compile=True'])
    engine.plan(cfg, env, [None] * 10, optimizer)
    assert 'the first step compiles the model (minutes on a CPU)' in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_ends_the_step_saves_it_and_the_same_command_resumes(
    tokenizer_ckpt, tmp_path, monkeypatch
):
    """SIGTERM (timeout, SLURM, docker stop, Kubernetes) as Ctrl-C: the step under way ends and is
    saved, one line, exit 128 + 15; the same command then resumes bit for bit."""
    args = [
        *TINY_PRE,
        f'--tokenizer={tokenizer_ckpt}',
        '--steps=5',
        '--workers=1',
        '--ckpt_every=100',
        '--data=demo:40',
    ]
    run_script('pretrain.py', *args, f'--out_dir={tmp_path / "full"}')
    lr = engine.get_lr

    def sigterm_in_step_3(step, *a):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr(step, *a)

    with monkeypatch.context() as m:
        m.setattr(engine, 'get_lr', sigterm_in_step_3)
        p = run_script('pretrain.py', *args, f'--out_dir={tmp_path / "term"}', ok=False)
    assert p.returncode == 143 and 'interrupted at step 3' in p.stdout and not p.stderr
    run_script('pretrain.py', *args, f'--out_dir={tmp_path / "term"}')
    a, b = (engine.read_checkpoint(tmp_path / d / 'ckpt.pt') for d in ('full', 'term'))
    assert a['step'] == b['step'] == 5
    same_state(a['model'], b['model'])


def children(pid):  # the processes a process started
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.slow
def test_sigterm_to_one_rank_under_torchrun_leaves_the_last_checkpoint(tokenizer_ckpt, tmp_path):
    """Under DDP a signal stops its rank at once, in one line (agreeing on a step would cost a
    collective every step); torchrun then stops the other; the last checkpoint stands and the same
    command resumes from it."""
    out = tmp_path / 'run'
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nproc_per_node=2',
        '--standalone',
        'pretrain.py',
        *TINY_PRE,
        f'--tokenizer={tokenizer_ckpt}',
        '--steps=400',
        '--workers=0',
        '--ckpt_every=2',
        f'--out_dir={out}',
    ]
    run = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / 'ckpt.pt').exists() and time.time() < deadline:
            time.sleep(0.2)
        ranks = children(run.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert (
        run.returncode != 0
        and 'SIGTERM: stopped; the last checkpoint written, if any, stands' in stderr
    ), stderr[-3000:]
    step = engine.read_checkpoint(out / 'ckpt.pt')['step']
    assert 2 <= step < 400
    p = subprocess.run(
        cmd[:-3]
        + [
            '--steps=' + str(step + 2),
            '--allow_change=steps',
            '--ckpt_every=2',
            f'--out_dir={out}',
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and f'resumed from {out}/ckpt.pt at step {step}' in p.stdout, p.stderr


@pytest.mark.slow
def test_two_torchrun_nodes_train_as_two_processes_of_one(tokenizer_ckpt, tmp_path):
    """Two "nodes" on this machine (--nnodes=2, a c10d rendezvous on localhost, gloo) train the same
    checkpoint as one node's two processes: the README's multi-node line, tested."""
    args = ['pretrain.py', *TINY_PRE, f'--tokenizer={tokenizer_ckpt}', '--steps=3', '--workers=0']
    env = dict(os.environ, OMP_NUM_THREADS='1')  # as torchrun sets it for 2 processes on a node
    one = subprocess.run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node=2',
            '--standalone',
            *args,
            f'--out_dir={tmp_path / "one"}',
        ],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    node = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nnodes=2',
        '--nproc_per_node=1',
        '--rdzv_backend=c10d',
        f'--rdzv_endpoint=localhost:{port}',
        '--rdzv_id=beitv2-test',
        *args,
        f'--out_dir={tmp_path / "two"}',
    ]
    nodes = [
        subprocess.Popen(
            node, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    a, b = (engine.read_checkpoint(tmp_path / d / 'ckpt.pt') for d in ('one', 'two'))
    assert a['world'] == b['world'] == 2 and a['step'] == b['step'] == 3
    same_state(a['model'], b['model'])
    same_state(opt_tensors(a['optimizer']), opt_tensors(b['optimizer']))


@pytest.mark.slow
def test_an_unreadable_image_ends_every_path_in_one_line(pretrain_ckpt, tmp_path):
    """A zero-byte file, read by a DataLoader worker or in this process: features (k-NN, compare),
    validation scoring, segmentation scoring and pictures all end in the one line that names it, and
    a run that has trained has written its checkpoint first."""
    both = image_folder(tmp_path / 'both', classes=2, per_class=8, splits=('train', 'val'))
    (both / 'train' / 'c0' / 'zero.png').write_bytes(b'')
    val_only = image_folder(tmp_path / 'val', classes=2, per_class=8, splits=('train', 'val'))
    (val_only / 'val' / 'c1' / 'zero.png').write_bytes(b'')
    base = [f'--checkpoint={pretrain_ckpt}', '--img_size=16', '--batch_size=4', '--steps=2']
    cases = [
        (['--mode=knn', f'--data={both}', '--workers=0'], None),
        (['--mode=knn', f'--data={both}', '--workers=2'], None),
        ([f'--data={both}', '--workers=0', "--backbones=('checkpoint',)"], None),
        (['--mode=linear', f'--data={val_only}', '--workers=0'], 2),
        (['--mode=finetune', f'--data={val_only}', '--workers=2', '--lr=1e-3'], 2),
    ]
    for i, (args, trained) in enumerate(cases):
        p = run_script('evaluate.py', *base, *args, f'--out_dir={tmp_path / str(i)}', ok=False)
        assert p.returncode == 2 and p.stderr.count('\n') == 1, p.stderr[-2000:]
        assert p.stderr.startswith('error: unreadable image') and 'zero.png' in p.stderr
        if trained:
            assert engine.read_checkpoint(tmp_path / str(i) / 'ckpt.pt')['step'] == trained
    ade = tmp_path / 'ade'
    for sub in ('training', 'validation'):
        (ade / 'images' / sub).mkdir(parents=True)
        (ade / 'annotations' / sub).mkdir(parents=True)
        for name in ('ADE_1', 'ADE_2'):
            Image.new('RGB', (40, 30), (10, 20, 30)).save(ade / 'images' / sub / f'{name}.jpg')
            Image.fromarray(np.full((30, 40), 3, np.uint8)).save(
                ade / 'annotations' / sub / f'{name}.png'
            )
    (ade / 'images' / 'validation' / 'ADE_2.jpg').write_bytes(b'')
    p = run_script(
        'evaluate.py',
        *base,
        '--mode=segment',
        f'--data=ade20k:{ade}',
        '--workers=0',
        '--batch_size=2',
        '--seg_layers=(0,0,1,1)',
        f'--out_dir={tmp_path / "seg"}',
        ok=False,
    )
    assert p.stderr.startswith('error: unreadable image') and 'ADE_2.jpg' in p.stderr, p.stderr[
        -2000:
    ]
    assert engine.read_checkpoint(tmp_path / 'seg' / 'ckpt.pt')['step'] == 2
    p = run_script(
        'pictures.py',
        f'--checkpoint={pretrain_ckpt}',
        f'--image={both}/train/c0/zero.png',
        f'--out_dir={tmp_path / "pic"}',
        ok=False,
    )
    assert p.stderr.startswith('error: unreadable image') and p.stderr.count('\n') == 1
