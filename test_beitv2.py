"""Tests of beitv2.py alone (it is all they import): copy them with the file.

    python -m pytest -q test_beitv2.py               # about a minute on 2 CPU cores

test_official_* compare against golden outputs of the official code (testdata/README.md); set
BEITV2_FIXTURE to check another fixture made the same way with other sizes, and
BEITV2_TEST_DEVICE=cuda to run them (and the attention and encode device tests) on a GPU.
test_scripts.py tests the stage scripts and what they share.
"""

import argparse
import json
import math
import os
import random
import socket
from pathlib import Path

# before torch loads OpenMP, as the scripts run themselves
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F

import beitv2


# ----------------------------------------------- shared: fixtures, tiny models


HERE = Path(__file__).resolve().parent


FIXTURE = os.environ.get('BEITV2_FIXTURE', str(HERE / 'testdata' / 'official_beitv2_small.pt'))


LAYOUTS = HERE / 'testdata' / 'official_layouts.json'


ATOL = 1e-10  # float64; testdata/README.md


DEVICE = torch.device(os.environ.get('BEITV2_TEST_DEVICE', 'cpu'))


if DEVICE.type == 'cuda':  # float32 means float32, as the scripts set it (common.Env): no TF32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope='module')
def fx():
    return torch.load(FIXTURE, weights_only=True)


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.double().cpu() - b.double().cpu()).abs().max().item()
    assert diff <= atol, diff


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny_beit(**over):
    d = dict(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=2,
        vocab_size=16,
        early_layers=2,
        head_layers=2,
    )
    d.update(over)
    return beitv2.BEiTv2(beitv2.BEiTConfig(**d))


def tiny_vqkd(**over):
    d = dict(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=2,
        decoder_depth=1,
        codebook_size=16,
        code_dim=8,
        teacher_dim=24,
    )
    d.update(over)
    return beitv2.VQKD(beitv2.VQKDConfig(**d))


# ------------------------------------ beitv2.py: parity with the official code


def vit_from_official(c, **over):
    rel = (
        'shared'
        if c.get('use_shared_rel_pos_bias')
        else 'per_block'
        if c.get('use_rel_pos_bias')
        else 'none'
    )
    d = dict(
        img_size=c['img_size'],
        patch_size=c['patch_size'],
        in_chans=c['in_chans'],
        embed_dim=c['embed_dim'],
        depth=c['depth'],
        num_heads=c['num_heads'],
        mlp_ratio=c['mlp_ratio'],
        qkv_bias=c['qkv_bias'],
        layer_scale=c['init_values'],
        abs_pos_emb=c['use_abs_pos_emb'],
        rel_pos=rel,
        fc_norm=c.get('use_mean_pooling', False),
        num_classes=c.get('num_classes', 0),
    )
    d.update(over)
    return d


def tokenizer_from_official(c):
    e, d = c['encoder_config'], c['decoder_config']
    assert (d['embed_dim'], d['num_heads']) == (e['embed_dim'], e['num_heads'])
    return beitv2.VQKD(
        beitv2.VQKDConfig(
            img_size=e['img_size'],
            patch_size=e['patch_size'],
            embed_dim=e['embed_dim'],
            depth=e['depth'],
            num_heads=e['num_heads'],
            decoder_depth=d['depth'],
            codebook_size=c['n_embed'],
            code_dim=c['embed_dim'],
            teacher_dim=c['decoder_out_dim'],
            decay=c['decay'],
        )
    )


def pretrain_from_official(c):
    d = vit_from_official(
        c, vocab_size=c['vocab_size'], early_layers=c['early_layers'], head_layers=c['head_layers']
    )
    assert c['shared_lm_head']
    return beitv2.BEiTv2(beitv2.BEiTConfig(**d))


@pytest.fixture(scope='module')
def tok(fx):
    t = fx['tokenizer']
    m = tokenizer_from_official(t['config']).double().eval()
    return beitv2.load_state(m, t['state_dict']).to(DEVICE)


def test_official_tokenizer_encoder(fx, tok):
    t = fx['tokenizer']
    x = t['images'].double().to(DEVICE)
    close(tok.encoder.forward_patch_tokens(x * 2 - 1), t['encoder_features'])
    feats = tok.code_vectors(x)
    close(feats, t['to_quantizer_features'])
    z, codes = tok.quantize.lookup(feats)
    close(z, t['normed_features'])
    close(tok.quantize.distances(z.flatten(0, 1)), t['distances'])
    assert torch.equal(codes.cpu(), t['indices'])
    assert torch.equal(tok.encode(x).cpu(), t['indices'])


def test_official_tokenizer_decoder_and_losses(fx, tok):
    t = fx['tokenizer']
    before = tok.quantize.cluster_size.clone()
    x = t['images'].double().to(DEVICE)
    rec, codes, losses = tok(x, t['teacher_features'].double().to(DEVICE))
    z_q, _, _ = tok.quantize(tok.code_vectors(x))
    # official: (B, d, h, w)
    close(z_q.transpose(1, 2).reshape(t['quantized'].shape), t['quantized'])
    close(rec, t['decoder_output'])
    for k in ('loss', 'rec_loss', 'quant_loss'):
        close(losses[k], t[k])
    # `cluster_size_after` is not checked: the official eval forward updates usage statistics
    # (and all-reduces them); ours is pure in eval mode, which is checked here instead.
    assert torch.equal(tok.quantize.cluster_size, before)


def test_official_ema_step(fx):
    e = fx['ema_step']
    c = e['config']
    q = (
        beitv2.NormEMACodebook(c['n_embed'], c['embedding_dim'], decay=e['decay'], beta=c['beta'])
        .double()
        .to(DEVICE)
    )
    # official names -> ours (embedding.cluster_size/embed_avg are never read)
    sd = e['state_dict_before']
    q.load_state_dict(
        dict(
            weight=sd['embedding.weight'],
            initted=sd['embedding.initted'],
            cluster_size=sd['cluster_size'],
        )
    )
    q.train()
    # official (B, d, h, w) -> (B, n, d)
    z = e['z'].double().to(DEVICE).permute(0, 2, 3, 1).flatten(1, 2)
    z_q, codes, loss = q(z)
    n, _, h, w = e['quantized'].shape  # sizes from the fixture: any fixture of this format works
    close(z_q.reshape(n, h, w, -1).permute(0, 3, 1, 2), e['quantized'])
    assert torch.equal(codes.flatten().cpu(), e['indices'])
    close(loss, e['loss'])
    after = e['state_dict_after']
    close(q.weight, after['embedding.weight'])
    close(q.cluster_size, after['cluster_size'])
    assert q.initted.item() == 1


@pytest.fixture(scope='module')
def pre(fx):
    p = fx['pretrain']
    return beitv2.load_state(
        pretrain_from_official(p['config']).double().eval(), p['state_dict']
    ).to(DEVICE), p


def test_official_pretrain_heads(pre):
    m, p = pre
    x, mask = p['images'].double().to(DEVICE), p['bool_masked_pos'].to(DEVICE)
    tokens = m.branches(x, mask)
    close(m.norm(tokens['mim'])[:, 1:], p['patch_tokens_mim'])
    close(m.norm(tokens['cls'])[:, 1:], p['patch_tokens_cls'])
    logits, losses = m(x, mask, p['target_indices'].to(DEVICE))
    close(logits['mim'], p['logits_mim'])
    close(logits['cls'], p['logits_cls'])
    for ours, official in (('loss_mim', 'loss_1'), ('loss_cls', 'loss_2'), ('loss', 'loss')):
        close(losses[ours], p[official])


def test_official_finetune_logits(fx):
    f = fx['finetune']
    m = beitv2.ViT(beitv2.ViTConfig(**vit_from_official(f['config']))).double().eval()
    m = beitv2.load_state(m, f['state_dict'])
    m, x = m.to(DEVICE), f['images'].double().to(DEVICE)
    close(m.forward_features(x), f['features'])
    close(m(x), f['logits'])


def test_official_float32_tolerance(fx, pre):
    """The same models in float32 stay within the fixture's float32 tolerance (1e-4)."""
    m, p = pre
    m32 = beitv2.load_state(pretrain_from_official(p['config']).eval(), p['state_dict']).to(DEVICE)
    logits, _ = m32(p['images'].to(DEVICE), p['bool_masked_pos'].to(DEVICE))
    close(logits['mim'], p['logits_mim'], atol=1e-4)
    t = fx['tokenizer']
    tok32 = beitv2.load_state(tokenizer_from_official(t['config']).eval(), t['state_dict']).to(
        DEVICE
    )
    assert torch.equal(tok32.encode(t['images'].to(DEVICE)).cpu(), t['indices'])


def test_rel_pos_table_resize_matches_official_interp2d():
    """The official loader: geometric source grid + scipy interp2d(kind='cubic'), which is FITPACK's
    interpolating spline; 14x14 -> 32x32 patches (224 -> 512 px). Golden output made with SciPy's
    RectBivariateSpline(s=0) and the official code's loop (testdata/README.md): SciPy is not
    needed."""
    ref = torch.load(HERE / 'testdata' / 'rel_pos_resize_scipy.pt', weights_only=True)
    close(beitv2.resize_rel_pos_table(ref['table'], 63 * 63 + 3), ref['resized'])


def test_spline_interpolates_reproduces_cubics_and_clamps():
    """What makes it FITPACK's interpolating spline and not another: it passes through its points, a
    cubic is its own spline (the not-a-knot ends; a natural spline bends a cubic at its ends), and
    reading is clamped to the points' range (FITPACK's evaluation)."""
    x = torch.tensor([-4.7, -2.2, -1.0, 0.0, 1.0, 2.2, 4.7], dtype=torch.float64)
    u = torch.linspace(-4.7, 4.7, 41, dtype=torch.float64)
    close(beitv2.spline_weights(x, x), torch.eye(7, dtype=torch.float64))
    for f in (lambda t: t**3 - 2 * t, lambda t: 0.5 * t**2 + 1):
        close(beitv2.spline_weights(x, u) @ f(x), f(u))
    close(
        beitv2.spline_weights(x, torch.tensor([-9.0, 9.0], dtype=torch.float64)),
        beitv2.spline_weights(x, x[[0, -1]]),
    )


def test_timm_beitv2_parity():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    ref = timm.create_model('beitv2_base_patch16_224', pretrained=False).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if 'relative_position_bias_table' in n or 'gamma' in n:
                p.normal_(0, 0.1)
    ours = beitv2.ViT(
        beitv2.classifier_config(beitv2.PRESETS['beitv2_base_patch16_224'], 1000)
    ).eval()
    ours = beitv2.load_state(ours, ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        close(ours(x), ref(x), atol=1e-4)
    ref.load_state_dict(ours.state_dict())  # timm's layout is ours


# ---------- beitv2.py: backbone (relative positions, attention paths, devices)


def test_relative_position_index_2x2():
    # patches (0,0) (0,1) (1,0) (1,1); offset (dy, dx) -> (dy + 1) * 3 + (dx + 1); table has 9 + 3
    # rows
    expected = torch.tensor(
        [[11, 9, 9, 9, 9], [10, 4, 3, 1, 0], [10, 5, 4, 2, 1], [10, 7, 6, 4, 3], [10, 8, 7, 5, 4]]
    )
    assert torch.equal(beitv2.relative_position_index(2, 2), expected)


@pytest.mark.parametrize(
    'dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize('rows', ['all', 'keep'])
def test_sdpa_path_equals_explicit_maths(dtype, tol, rows):
    """attention()'s two paths (explicit maths, fused SDPA), outputs and gradients of q, k, v and
    the bias, against the explicit maths in float64, on BEITV2_TEST_DEVICE: the SDPA path is what
    every GPU run takes. rows='keep': the fast path's queries (B, nh, K, hs) with a (B, nh, K, N)
    bias."""
    g = torch.Generator().manual_seed(0)
    b, nh, n, hs = 2, 3, 197, 64  # 197 tokens: ViT-B/16 at 224, not a multiple of 8
    nq = 76 if rows == 'keep' else n
    bias_shape = (b, nh, nq, n) if rows == 'keep' else (nh, n, n)
    inputs = [
        torch.randn(b, nh, nq, hs, generator=g),
        torch.randn(b, nh, n, hs, generator=g),
        torch.randn(b, nh, n, hs, generator=g),
        torch.randn(bias_shape, generator=g),
    ]
    grad_out = torch.randn(b, nh, nq, hs, generator=g, dtype=torch.float64)

    def run(dtype, explicit):
        xs = [t.to(DEVICE, dtype, copy=True).requires_grad_() for t in inputs]
        out = beitv2.attention(*xs, explicit=explicit)
        (out.double() * grad_out.to(DEVICE)).sum().backward()
        return [out] + [t.grad for t in xs]

    ref = run(torch.float64, explicit=True)
    for explicit in (True, False):
        got = run(dtype, explicit)
        for name, a, r in zip(('out', 'dq', 'dk', 'dv', 'dbias'), got, ref):
            assert a.shape == r.shape and rel_err(a, r) <= tol, (name, explicit, rel_err(a, r))


def test_shared_bias_is_contiguous():
    """SDPA's memory-efficient CUDA kernel refuses a bias with a strided last dim and falls back to
    the fp32 maths (measured on an H200: ViT-B step 116 instead of 81 ms); keep it contiguous."""
    m = tiny_beit()
    assert m.shared_pos_bias().is_contiguous()
    assert beitv2.pos_bias_from_table(
        beitv2.ViT(beitv2.classifier_config(m.cfg, 10)).blocks[0].attn
    ).is_contiguous()


def test_model_through_sdpa_equals_explicit(monkeypatch):
    """The whole pretraining model (both heads, fast path) with attention forced through SDPA."""
    torch.manual_seed(0)
    m = tiny_beit().double().to(DEVICE).eval()
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    mask = torch.stack([beitv2.MaskingGenerator((4, 4))() for _ in range(3)]).to(DEVICE)
    explicit, _ = m(x, mask)
    plain = beitv2.attention
    monkeypatch.setattr(beitv2, 'attention', lambda *a, **k: plain(*a, explicit=False))
    fused, _ = m(x, mask)
    for name in explicit:
        close(fused[name], explicit[name])


def test_attention_without_k_bias_equals_full_qkv_bias():
    """Why DINO's qkv.bias loads into q_bias/v_bias: the k bias adds q.b_k to every logit of a
    query, a constant that softmax removes."""
    torch.manual_seed(0)
    attn = beitv2.Attention(32, 2).double()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    k_bias = torch.randn(32, dtype=torch.float64)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    qkv = x @ attn.qkv.weight.T + torch.cat([attn.q_bias, k_bias, attn.v_bias])
    q, k, v = qkv.view(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    ref = ((q @ k.transpose(-2, -1) / 4).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32)
    close(attn(x), attn.proj(ref))


def test_pretrain_state_into_classifier_gives_same_tokens():
    torch.manual_seed(0)
    pre = tiny_beit().eval()
    with torch.no_grad():  # a non-zero shared table, so the copy into every block matters
        pre.rel_pos_bias.relative_position_bias_table.normal_()
    clf = beitv2.ViT(beitv2.classifier_config(pre.cfg, num_classes=5, drop_path=0.0)).eval()
    beitv2.load_state(clf, pre.state_dict(), ignore=beitv2.PRETRAIN_ONLY + ('fc_norm', 'head'))
    x = torch.randn(2, 3, 32, 32)
    close(clf.forward_tokens(x)[0], pre.forward_tokens(x)[0], atol=1e-6)
    # without the documented drops the load is refused
    with pytest.raises(KeyError, match='lm_head'):
        beitv2.load_state(
            beitv2.ViT(beitv2.classifier_config(pre.cfg, num_classes=5)), pre.state_dict()
        )


def test_official_layout_classifier_loads_at_another_size():
    """An official fine-tuned file carries relative_position_index buffers of its own grid: at
    another image size the tables are resized and those buffers (derived) are not compared."""
    torch.manual_seed(0)
    small = beitv2.ViT(beitv2.classifier_config(tiny_beit().cfg, 10))
    big = beitv2.ViT(beitv2.classifier_config(tiny_beit().cfg, 10, img_size=48))
    beitv2.load_state(big, beitv2.export_state(small))
    assert big.blocks[0].attn.relative_position_bias_table.shape[0] == 11 * 11 + 3  # 6x6 patches


def test_clear_errors_for_models_built_wrong():
    for bad in (dict(rel_pos='per_block'), dict(fc_norm=True)):
        with pytest.raises(ValueError, match="BEiTv2 needs rel_pos='shared' and fc_norm=False"):
            tiny_beit(**bad)
    with pytest.raises(ValueError, match='no classification head'):
        beitv2.ViT(beitv2.ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2))(
            torch.randn(1, 3, 32, 32)
        )


def test_a_block_is_counted_from_0_or_from_the_end():
    assert beitv2.block_index(-1, 6) == 5 and beitv2.block_index(0, 6) == 0
    for bad in (6, 99, -7):
        with pytest.raises(ValueError, match=r'blocks 0..5 \(or -1'):
            beitv2.block_index(bad, 6)


def test_without_a_cls_head_only_the_main_branch_predicts():
    logits, losses = tiny_beit(head_layers=0)(
        torch.randn(2, 3, 32, 32),
        torch.ones(2, 16, dtype=torch.bool),
        torch.zeros(2, 16, dtype=torch.long),
    )
    assert set(logits) == {'mim'} and set(losses) == {'loss_mim', 'loss'}


def test_the_python_api_says_what_it_expects():
    m = tiny_beit().eval()
    x, none = torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.bool)
    for call, msg in [
        (lambda: m(x, none, torch.zeros(2, 16, dtype=torch.long)), 'no masked patch'),
        (lambda: m(x, none, num_masked=0), 'no masked patch'),
        (lambda: beitv2.MaskingGenerator((4, 4), 10.5), 'cannot mask 10.5'),
    ]:
        with pytest.raises(ValueError, match=msg):
            call()
    tok = tiny_vqkd().eval()
    images = torch.rand(2, 3, 32, 32)
    for dtype in (torch.float64, torch.float16):  # any float input: cast to the model's dtype
        assert torch.equal(tok.encode(images.to(dtype)), tok.encode(images.to(dtype).float()))


def test_load_backbone_reads_an_official_pretraining_file(tmp_path):
    """An official pretraining file (no config of ours: read off its shapes, its 'args' a Namespace)
    as the backbone it trained, or as a classifier with a table per block: the same tokens."""
    torch.manual_seed(0)
    pre = tiny_beit(embed_dim=64, num_heads=1).eval()
    with torch.no_grad():
        pre.rel_pos_bias.relative_position_bias_table.normal_()
    args = argparse.Namespace(model='beit_base_patch16_224_8k_vocab_cls_pt')
    torch.save({'model': beitv2.export_state(pre), 'args': args, 'epoch': 3}, tmp_path / 'pt.pth')
    vit = beitv2.load_backbone(tmp_path / 'pt.pth').eval()
    x = torch.randn(2, 3, 32, 32)
    close(vit.features(x), pre.norm(pre.forward_tokens(x)[0][:, 0]), atol=1e-6)  # [CLS], normed
    close(vit.features(x, 'mean'), pre.norm(pre.forward_tokens(x)[0][:, 1:].mean(1)), atol=1e-6)
    clf = beitv2.load_backbone(tmp_path / 'pt.pth', num_classes=5).eval()
    assert clf.cfg.rel_pos == 'per_block' and clf.head.out_features == 5
    close(clf.forward_tokens(x)[0], pre.forward_tokens(x)[0], atol=1e-5)
    with pytest.raises(ValueError, match='a tokenizer, not a backbone'):
        beitv2.load_backbone({'model': tiny_vqkd().state_dict()})


def test_classifier_at_higher_resolution_interpolates_tables():
    torch.manual_seed(0)
    pre = tiny_beit()
    clf = beitv2.ViT(beitv2.classifier_config(pre.cfg, num_classes=5, img_size=48))
    beitv2.load_state(clf, pre.state_dict(), ignore=beitv2.PRETRAIN_ONLY + ('fc_norm', 'head'))
    assert clf.blocks[0].attn.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert clf(torch.randn(1, 3, 48, 48)).shape == (1, 5)


# ------------- beitv2.py: stage 1, VQ-KD (codebook, k-means, EMA, encode, DDP)


def test_codebook_kmeans_ema_and_roundtrip():
    torch.manual_seed(0)
    tok = tiny_vqkd().train()
    x, t = torch.rand(4, 3, 32, 32), torch.randn(4, 16, 24)
    assert tok.quantize.initted.item() == 0
    _, codes, _ = tok(x, t)  # k-means init on the first training batch, then one EMA step
    assert tok.quantize.initted.item() == 1
    close(tok.quantize.weight.norm(dim=1), torch.ones(16), atol=1e-6)
    tok.eval()
    state = {k: v.clone() for k, v in tok.quantize.state_dict().items()}
    c1, c2 = tok.encode(x), tok.encode(x)
    assert torch.equal(c1, c2) and c1.dtype == torch.int64 and c1.shape == (4, 16)
    assert all(torch.equal(v, tok.quantize.state_dict()[k]) for k, v in state.items())  # pure
    z_q, codes, _ = tok.quantize(tok.code_vectors(x))
    close(z_q, tok.quantize.weight[codes], atol=1e-6)  # straight-through value = the codes


def test_code_usage_counts_codes_and_perplexity():
    u = beitv2.code_usage(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert (u['codes_used'], u['used_share']) == (2, 0.5) and abs(u['perplexity'] - 2.0) < 1e-9
    assert beitv2.code_usage(torch.ones(8))['perplexity'] == pytest.approx(8)  # all used alike: K


def test_ema_update_by_hand():
    q = beitv2.NormEMACodebook(3, 2, decay=0.5).train()
    q.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    q.initted.fill_(1)
    z = torch.tensor([[[1.0, 0.2], [0.9, -0.1], [0.1, 1.0]]])
    q(z)
    zn = F.normalize(z[0], dim=-1)
    new0 = F.normalize(
        0.5 * torch.tensor([1.0, 0.0]) + 0.5 * F.normalize(zn[0] + zn[1], dim=0), dim=0
    )
    new1 = F.normalize(0.5 * torch.tensor([0.0, 1.0]) + 0.5 * zn[2], dim=0)
    # code 2 unused
    close(q.weight, torch.stack([new0, new1, torch.tensor([-1.0, 0.0])]), atol=1e-6)
    close(q.cluster_size, torch.tensor([1.0, 0.5, 0.0]), atol=1e-6)


def test_kmeans_needs_enough_vectors():
    with pytest.raises(ValueError, match='at least 16 vectors'):
        beitv2.kmeans(F.normalize(torch.randn(10, 8), dim=-1), 16)


def test_encode_on_device_equals_float64_except_near_ties():
    """Codes from a float32 encode on BEITV2_TEST_DEVICE equal the float64 CPU codes, except where
    the two codes are a near-tie in float64 (cosine within 1e-4); the count is printed."""
    torch.manual_seed(0)
    tok = tiny_vqkd(codebook_size=64, img_size=64).train()
    x = torch.rand(16, 3, 64, 64)
    tok(x, torch.randn(16, 64, 24))  # k-means init on this batch
    tok.eval()
    tok64 = tok.double()
    with torch.no_grad():
        z = tok64.quantize.lookup(tok64.code_vectors(x.double()))[0].flatten(0, 1)
        sims = z @ tok64.quantize.weight.t()  # (M, K) cosines
        ref = sims.argmax(1)
        got = tok.float().to(DEVICE).encode(x.to(DEVICE)).flatten().cpu()
    differ = (got != ref).nonzero().squeeze(1)
    gap = sims[differ, ref[differ]] - sims[differ, got[differ]]
    print(
        f'{DEVICE}: {len(differ)} of {len(ref)} codes differ from float64, '
        f'largest cosine gap {gap.max() if len(gap) else 0}'
    )
    assert (gap < 1e-4).all()


def test_encode_says_what_it_expects():
    tok = tiny_vqkd().eval()  # 32 px, patch 8: 16 codes
    for bad, msg in [
        (torch.rand(3, 32, 32), r'shape \(B, 3, 32, 32\)'),
        (torch.rand(2, 3, 16, 16), 'shape'),
        (torch.rand(2, 1, 32, 32), 'shape'),
        (torch.rand(2, 3, 32, 32) * 255, r'\[0, 1\]'),
        ((torch.rand(2, 3, 32, 32) - 0.45) / 0.225, r'\[0, 1\]'),
        (torch.full((2, 3, 32, 32), float('nan')), 'non-finite'),
    ]:
        # a good call first: CPU input is checked anew
        assert tok.encode(torch.rand(2, 3, 32, 32)).shape == (2, 16)
        with pytest.raises(ValueError, match=msg):
            tok.encode(bad)


def test_load_state_names_what_does_not_fit():
    demo = beitv2.BEiTv2(beitv2.PRESETS['beitv2_demo']).state_dict()
    with pytest.raises(
        KeyError, match=r'wrong shape .*patch_embed.proj.weight \(96, 3, 4, 4\) vs \(192, 3, 16, 16'
    ):
        beitv2.load_state(beitv2.BEiTv2(beitv2.PRESETS['beitv2_tiny_patch16_224']), demo)
    with pytest.raises(ValueError, match='of a whole checkpoint: state_dict_of'):
        beitv2.load_state(tiny_beit(), {'model': tiny_beit().state_dict(), 'step': 3})
    with pytest.raises(ValueError, match='takes a state dict'):
        beitv2.load_state(tiny_beit(), [1, 2])


@pytest.mark.parametrize(
    'cfg,msg',
    [
        (beitv2.ViTConfig(embed_dim=100, num_heads=3), 'embed_dim % num_heads = 0'),
        (beitv2.ViTConfig(img_size=30, patch_size=4), 'img_size % patch_size = 0'),
        (beitv2.BEiTConfig(depth=6, early_layers=8), 'reads a block 1..depth=6'),
    ],
)
def test_a_config_that_cannot_be_built_says_so(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        (beitv2.BEiTv2 if isinstance(cfg, beitv2.BEiTConfig) else beitv2.ViT)(cfg)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_codebook_worker(rank, world, port, sync, z, out):

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    q = beitv2.NormEMACodebook(16, z.shape[-1], decay=0.9).train()
    beitv2.NormEMACodebook.sync = sync
    q(z[rank : rank + 1])  # k-means init on this rank's half, then one EMA step
    torch.save(q.state_dict(), os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()


def run_ddp_codebook(z, sync, tmp_path):
    torch.multiprocessing.spawn(
        _ddp_codebook_worker, args=(2, free_port(), sync, z, str(tmp_path)), nprocs=2
    )
    return [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]


def test_ddp_codebook_identical_on_ranks_and_equal_to_one_process(tmp_path):
    torch.manual_seed(1)
    z = torch.randn(2, 64, 8)
    z[1] += 1.5  # the two ranks see different data
    # one process that sees both halves with the initial means rank 0 draws
    torch.manual_seed(0)
    q = beitv2.NormEMACodebook(16, 8, decay=0.9).train()
    z0 = F.normalize(z[0], dim=-1)
    init = z0[torch.randperm(64)[:16]]
    means, _ = beitv2.kmeans(F.normalize(z, dim=-1).flatten(0, 1), 16, means=init)
    q.weight.copy_(means)
    q.initted.fill_(1)
    q(z.reshape(1, 128, 8))
    r0, r1 = run_ddp_codebook(z, True, tmp_path)
    assert torch.equal(r0['weight'], r1['weight']) and torch.equal(
        r0['cluster_size'], r1['cluster_size']
    )
    close(r0['weight'], q.weight, atol=1e-5)
    close(r0['cluster_size'], q.cluster_size, atol=1e-5)
    # the same check fails when synchronisation is off: the ranks then disagree
    r0, r1 = run_ddp_codebook(z, False, tmp_path)
    assert (r0['weight'] - r1['weight']).abs().max() > 1e-3


# --------------------- beitv2.py: stage 2, MIM (masking, heads, static shapes)


def test_masking_exact_count_and_blocks():
    rng = random.Random(0)
    gen = beitv2.MaskingGenerator((14, 14))
    assert (gen.num, gen.min_num) == (75, 16)
    sizes = []
    for _ in range(300):
        m = gen(rng)
        assert m.shape == (196,) and m.dtype == torch.bool and int(m.sum()) == 75
        sizes.append(largest_component(m.view(14, 14)))
    assert sorted(sizes)[len(sizes) // 2] >= 16  # block-wise, not scattered patches
    small = beitv2.MaskingGenerator((4, 4))
    assert (small.num, small.min_num) == (6, 2)
    assert all(int(small(rng).sum()) == 6 for _ in range(100))


def largest_component(m):
    seen, best = set(), 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j] and (i, j) not in seen:
                stack, size = [(i, j)], 0
                seen.add((i, j))
                while stack:
                    a, b = stack.pop()
                    size += 1
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if (
                            0 <= c < m.shape[0]
                            and 0 <= d < m.shape[1]
                            and m[c, d]
                            and (c, d) not in seen
                        ):
                            seen.add((c, d))
                            stack.append((c, d))
                best = max(best, size)
    return best


def test_masking_generator_rejects_impossible_settings():
    for kwargs in [
        dict(min_aspect=0),
        dict(num_masking_patches=100),
        dict(min_num_patches=0),
        dict(min_num_patches=10, max_num_patches=5),
    ]:
        with pytest.raises(ValueError):
            beitv2.MaskingGenerator((8, 8), **kwargs)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    pre = tiny_beit(drop_path=0.1).train()
    mask = torch.stack([beitv2.MaskingGenerator((4, 4))() for _ in range(2)])
    _, losses = pre(torch.randn(2, 3, 32, 32), mask, torch.randint(0, 16, (2, 16)))
    losses['loss'].backward()
    assert [n for n, p in pre.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    tok = tiny_vqkd().train()
    _, _, losses = tok(torch.rand(2, 3, 32, 32), torch.randn(2, 16, 24))
    losses['loss'].backward()
    assert [n for n, p in tok.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_masked_rows_with_a_count_equal_boolean_indexing():
    """num_masked: the masked rows by a fixed-size gather, in x[mask]'s order; a wrong count is
    refused."""
    torch.manual_seed(0)
    m = tiny_beit().double().eval()
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_()
    x, targets = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 16, (3, 16))
    mask = torch.stack([beitv2.MaskingGenerator((4, 4))() for _ in range(3)])  # 6 of 16 in each
    plain, plain_losses = m(x, mask, targets)
    fixed, fixed_losses = m(x, mask, targets, num_masked=6)
    for name in plain:
        assert torch.equal(fixed[name], plain[name])
        assert torch.equal(fixed_losses[f'loss_{name}'], plain_losses[f'loss_{name}'])
    with pytest.raises(RuntimeError, match='num_masked'):
        m(x, mask, targets, num_masked=5)
    for bad in (mask.long(), mask[:, :8], mask.float()):
        with pytest.raises(ValueError, match=r'mask must be a bool tensor of shape \(B, 16\)'):
            m(x, bad, targets)


def test_compiled_pretraining_step_has_no_graph_break():
    """With num_masked, the training forward (both heads, losses) is one graph: no data-dependent
    shape, no host sync (torch._dynamo.explain traces it on the CPU; nothing is compiled)."""

    torch.manual_seed(0)
    m = tiny_beit(drop_path=0.1).train()
    mask = torch.stack([beitv2.MaskingGenerator((4, 4))() for _ in range(2)])
    x, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 16, (2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(x, mask, targets, num_masked=6)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    # x[mask]: the official way breaks
    assert torch._dynamo.explain(m)(x, mask, targets).graph_break_count > 0


# ------------------------------------------------------ beitv2.py: checkpoints


def layout(name):
    return json.loads(LAYOUTS.read_text())['layouts'][name]


# zeros, and random fc1 weights (the ones checked): filling 300M numbers takes seconds
def random_state(lay):
    dt = {'float32': torch.float32, 'int64': torch.int64}
    return {
        k: torch.randn(s) if k.endswith('fc1.weight') else torch.zeros(s, dtype=dt[d])
        for k, (s, d) in lay.items()
    }


def full_size_models():
    def tok(name):
        return beitv2.VQKD(beitv2.PRESETS['vqkd_encoder_base_decoder_' + name])

    base = beitv2.PRESETS['beitv2_base_patch16_224']
    large = beitv2.PRESETS['beitv2_large_patch16_224']
    yield 'tokenizer/vqkd_encoder_base_decoder_1x768x12_clip', lambda: tok('1x768x12_clip')
    yield 'tokenizer/vqkd_encoder_base_decoder_3x768x12_clip', lambda: tok('3x768x12_clip')
    yield 'tokenizer/vqkd_encoder_base_decoder_1x768x12_dino', lambda: tok('1x768x12_dino')
    yield 'pretrain/beit_base_patch16_224_8k_vocab_cls_pt', lambda: beitv2.BEiTv2(base)
    yield 'pretrain/beit_large_patch16_224_8k_vocab_cls_pt', lambda: beitv2.BEiTv2(large)
    yield 'finetune/beit_base_patch16_224', lambda: beitv2.ViT(beitv2.classifier_config(base, 1000))
    yield (
        'finetune/beit_large_patch16_224',
        lambda: beitv2.ViT(beitv2.classifier_config(large, 1000)),
    )
    yield 'timm/beitv2_base_patch16_224', lambda: beitv2.ViT(beitv2.classifier_config(base, 1000))
    yield 'timm/beitv2_large_patch16_224', lambda: beitv2.ViT(beitv2.classifier_config(large, 1000))


@pytest.mark.parametrize(
    'name,build', list(full_size_models()), ids=[n for n, _ in full_size_models()]
)
def test_full_size_layouts_load_and_export(name, build, monkeypatch):
    # the weights are loaded: no random init (seconds at this size)
    for m in (torch.nn.Linear, torch.nn.Conv2d):
        monkeypatch.setattr(m, 'reset_parameters', lambda self: None)
    monkeypatch.setattr(beitv2, 'trunc_normal_', lambda t, *a, **k: t)
    lay = layout(name)
    sd = random_state(lay)
    for k in sd:
        if k.endswith('relative_position_index'):  # the official buffer, as saved in the files
            g = int(math.sqrt(sd[k].shape[0] - 1))
            sd[k] = beitv2.relative_position_index(g, g)
    torch.manual_seed(0)
    model = beitv2.load_state(build(), sd)
    exported = model.state_dict() if name.startswith('timm') else beitv2.export_state(model)
    assert {
        k: [list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in exported.items()
    } == lay
    k = next(k for k in sd if k.endswith('fc1.weight'))
    assert torch.equal(exported[k], sd[k])
    if not name.startswith('tokenizer'):  # one call builds the backbone of the file, strictly
        vit = beitv2.load_backbone({'model': sd})
        arch = model.cfg
        assert (vit.cfg.embed_dim, vit.cfg.depth, vit.cfg.num_heads, vit.cfg.img_size) == \
            (arch.embed_dim, arch.depth, arch.num_heads, arch.img_size)
        assert vit.cfg.rel_pos == arch.rel_pos and vit.cfg.fc_norm == arch.fc_norm
        assert torch.equal(vit.state_dict()[k], sd[k])
        assert beitv2.load_backbone({'model': sd}, num_classes=10).head.out_features == 10


def test_layout_errors_name_the_keys():
    base = beitv2.PRESETS['beitv2_base_patch16_224']
    model = beitv2.BEiTv2(
        beitv2.BEiTConfig(
            **{
                **base.__dict__,
                'depth': 2,
                'early_layers': 1,
                'embed_dim': 48,
                'num_heads': 2,
                'vocab_size': 16,
                'img_size': 32,
            }
        )
    )
    sd = model.state_dict()
    bad = dict(sd)
    del bad['lm_head.bias']
    bad['extra.weight'] = torch.zeros(1)
    with pytest.raises(
        KeyError, match=r"missing \['lm_head.bias'\].*unexpected \['extra.weight'\]"
    ):
        beitv2.load_state(model, bad)
    bad = dict(
        sd, **{'rel_pos_bias.relative_position_index': torch.zeros(17, 17, dtype=torch.long)}
    )
    with pytest.raises(ValueError, match='relative_position_index'):
        beitv2.load_state(model, bad)
    with pytest.raises(ValueError, match='no state dict'):
        beitv2.state_dict_of({'args': 1})


def test_official_tokenizer_file_with_teacher_keys_loads(tmp_path, fx):
    t = fx['tokenizer']
    sd = dict(
        t['state_dict'],
        **{'teacher_model.visual.proj': torch.zeros(3), 'scaling_layer.shift': torch.zeros(1)},
    )
    torch.save({'model': sd}, tmp_path / 'vqkd.pth')
    sd = beitv2.state_dict_of(beitv2.load_file(tmp_path / 'vqkd.pth'))
    m = beitv2.load_state(tokenizer_from_official(t['config']).eval(), sd)
    assert torch.equal(m.encode(t['images']), t['indices'])


def test_load_tokenizer_reads_the_config_off_an_official_file(tmp_path):
    torch.manual_seed(0)
    # 64-dim heads
    tok = tiny_vqkd(embed_dim=128, num_heads=2, decoder_depth=2, teacher_dim=40).eval()
    torch.save({'model': beitv2.export_state(tok)}, tmp_path / 'vqkd_official_layout.pth')
    loaded = beitv2.load_tokenizer(tmp_path / 'vqkd_official_layout.pth')
    assert loaded.cfg == tok.cfg and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    with pytest.raises(ValueError, match='not a tokenizer'):
        torch.save({'model': tiny_beit().state_dict()}, tmp_path / 'pre.pth')
        beitv2.load_tokenizer(tmp_path / 'pre.pth')


def test_load_tokenizer_refuses_a_backbone_file(tmp_path):
    torch.save({'model': tiny_beit().state_dict()}, tmp_path / 'p.pt')
    with pytest.raises(ValueError, match='not a tokenizer checkpoint.*backbone'):
        beitv2.load_tokenizer(tmp_path / 'p.pt')
