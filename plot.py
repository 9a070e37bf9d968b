"""Pictures of runs: the training curves of each run from its OUT_DIR/log.jsonl, and the probe
results of `evaluate.py --mode=compare` from its OUT_DIR/result.json. Needs matplotlib (optional:
the training scripts never import it).

    python plot.py out/tokenizer out/pretrain out/eval/compare  # OUT_DIR/curves.png, results.png
    python plot.py --together=val_top1 out/ft/a out/ft/b        # one panel, a line per run
"""
import json
import os
import sys

# what the logs hold that is not a training curve
SKIP = {'step', 'img_per_s', 'eta_min', 'gnorm', 'quant_loss', 'data_wait'}


def read_log(path):
    """The rows of a log.jsonl or result.json; a line cut short (a kill while writing) is left
    out."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.rstrip().endswith('}')]


def plot_curves(plt, runs, title, path, only=None):
    """One panel per logged metric against the step (training lines and val_* scores, each from the
    lines that hold it), a line per run of `runs` ({name: rows}); mlm_acc_1 / _2 and loss_1 / _2
    share a panel. only: that metric's panel alone (several runs side by side, e.g. fine-tuning
    seeds against from scratch)."""
    keys = list(dict.fromkeys(k for rows in runs.values() for r in rows for k, v in r.items()
                              if k not in SKIP and isinstance(v, (int, float))))
    panels = [only] if only else [k for k in keys if k not in ('mlm_acc_2', 'loss_2')]
    width = 3.2 * len(panels) + 2 * bool(only)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 2.8), squeeze=False)
    for ax, k in zip(axes[0], panels):
        pair = None if only else {'mlm_acc_1': 'mlm_acc_2', 'loss_1': 'loss_2'}.get(k)
        names = [k] + ([pair] if pair in keys else [])
        for run, rows in runs.items():
            for name in names:
                have = [r for r in rows if name in r and 'step' in r]
                style = '.-' if len(have) < 20 else '-'
                ax.plot([r['step'] for r in have], [r[name] for r in have], style,
                        label=run if len(runs) > 1 else name)
        ax.set_title(' / '.join(names), fontsize=9)
        ax.set_xlabel('step', fontsize=8)
        ax.tick_params(labelsize=7)
        if len(names) > 1 or len(runs) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_results(plt, rows, title, path):
    """Bars: top-1 of each backbone (pretrained / random init / raw pixels) for each probe, averaged
    over the seeds of the last checkpoint compared into this folder, with every seed as a dot."""
    rows = [r for r in rows if r.get('mode') == 'compare_run']
    last = rows[-1].get('checkpoint')
    rows = [r for r in rows if r.get('checkpoint') == last]  # not other checkpoints'
    if last:
        title = f'{title}: {last}'
    probes = list(dict.fromkeys(r['probe'] for r in rows))  # as compare prints them
    backbones = ['pretrained', 'random init', 'raw pixels']
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(probes), 3.2))
    width = 0.8 / len(backbones)
    for j, b in enumerate(backbones):
        for i, p in enumerate(probes):
            vals = [r['top1'] for r in rows if r['probe'] == p and r['backbone'] == b]
            if not vals:
                continue
            x = i + (j - 1) * width
            ax.bar(x, sum(vals) / len(vals), width, color=f'C{j}', label=b if i == 0 else None)
            ax.plot([x] * len(vals), vals, 'k.', markersize=4)
    chance = rows[0].get('chance') if rows else None
    if chance:
        ax.axhline(chance, color='gray', linestyle='--', linewidth=1, label='chance')
    ax.set_xticks(range(len(probes)), probes)
    ax.set_ylabel('top-1 (%)')
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(dirs):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('error: plot.py needs matplotlib (pip install matplotlib); training does not')
    if not dirs:
        sys.exit(__doc__)
    if dirs[0].startswith('--together='):
        key, dirs = dirs[0].split('=', 1)[1], dirs[1:]
        missing = [d for d in dirs if not os.path.exists(os.path.join(d, 'log.jsonl'))]
        if missing or not dirs:
            sys.exit(f'error: no log.jsonl in {", ".join(missing) or "(no folders given)"}')
        plot_curves(plt, {d: read_log(os.path.join(d, 'log.jsonl')) for d in dirs}, key,
                    f'{key}.png', only=key)
        print(f'wrote {key}.png')
        return [f'{key}.png']
    written = []
    for d in dirs:
        log, res = os.path.join(d, 'log.jsonl'), os.path.join(d, 'result.json')
        if os.path.exists(log) and read_log(log):
            written.append(os.path.join(d, 'curves.png'))
            plot_curves(plt, {d: read_log(log)}, d, written[-1])
        if os.path.exists(res) and any(r.get('mode') == 'compare_run' for r in read_log(res)):
            written.append(os.path.join(d, 'results.png'))
            plot_results(plt, read_log(res), d, written[-1])
        if not os.path.exists(log) and not os.path.exists(res):
            sys.exit(f'error: {d} has neither log.jsonl nor result.json')
    print('wrote ' + ', '.join(written))
    return written


if __name__ == '__main__':
    main(sys.argv[1:])
