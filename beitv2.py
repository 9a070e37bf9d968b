"""BEiT v2 in one file: ViT backbone, VQ-KD tokenizer, masked image modeling with a [CLS] head.

Paper: Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers",
https://arxiv.org/abs/2208.06366. Official code: github.com/microsoft/unilm, folder beit2/. Stage 1
(train_tokenizer.py): VQKD learns 8192 codes by regressing a teacher's (CLIP) features. Stage 2
(pretrain.py): BEiTv2 predicts the codes of ~40% block-masked patches. Stage 3 (evaluate.py): linear
probe / fine-tune / segment with the backbone (load_backbone). Read top to bottom; each section only
uses what is above it. It imports torch, numpy and torchvision's drop path. Parameter names are the
official (and timm) ones, so official weights load by name.

Where the code departs from the paper's text, as the official code does (each marked where it
stands):
- the nearest code by cosine is found as the smallest squared distance between unit vectors (same
  order);
- the codebook learns by an EMA of the vectors assigned to it, in place of the paper's codebook loss
  term;
- a small MLP (encode_task_layer) maps the encoder's features to the code dimension before the
  lookup;
- drop path grows linearly over max(depth, early_layers + head_layers) blocks, the [CLS] head's
  included.
"""
import argparse
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth  # drop path: a residual branch off, for some samples

# --------------------------------------------------------------------- configs


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True         # separate q and v biases; the k bias is always zero
    layer_scale: float = 0.1      # gamma_1/gamma_2 init (CaiT); 0 = no layer scale (tokenizer ViTs)
    abs_pos_emb: bool = False     # learned absolute position embedding (the tokenizer's ViTs)
    # relative position tables: one for all blocks ('shared', pretraining), one per block
    # ('per_block', fine-tuning) or none ('none', the tokenizer's ViTs)
    rel_pos: str = 'shared'
    # the final norm: True, `fc_norm` on the patch tokens (a classifier mean-pools them; the
    # tokenizer's ViTs); False, `norm` on all tokens (the [CLS] token is the feature)
    fc_norm: bool = False
    num_classes: int = 0          # classification head size; 0 = no head
    drop_path: float = 0.0        # stochastic depth rate of the last block (linear in depth)


@dataclass
class BEiTConfig(ViTConfig):      # the pretraining model: a ViT plus the MIM heads
    vocab_size: int = 8192        # = tokenizer codebook size
    early_layers: int = 9         # [CLS] head reads the patch tokens after this many blocks
    head_layers: int = 2          # extra blocks of the [CLS] head (0 = BEiT v1-style MIM only)


@dataclass
class VQKDConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768          # encoder and decoder width (the official presets use one width)
    depth: int = 12               # encoder blocks
    num_heads: int = 12
    decoder_depth: int = 3        # 1 or 3 in the released tokenizers
    codebook_size: int = 8192     # K codes
    code_dim: int = 32            # codebook dimension d (factorized: looked up in 32-d, not 768-d)
    teacher_dim: int = 512        # decoder output: 512 for CLIP ViT-B/16, 768 for DINO ViT-B/16
    decay: float = 0.99           # codebook EMA decay
    beta: float = 1.0             # commitment loss weight


PRESETS = {  # the one definition of each architecture; official names for the official ones
    # the quick start's: minutes on a 2-core CPU
    'vqkd_demo': VQKDConfig(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                            decoder_depth=1, codebook_size=512, code_dim=16),
    'beitv2_demo': BEiTConfig(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                              early_layers=4, vocab_size=512),
    'beitv2_tiny_patch16_224': BEiTConfig(embed_dim=192, num_heads=3),  # ViT-Tiny: bench.py's
    'vqkd_encoder_base_decoder_1x768x12_clip': VQKDConfig(decoder_depth=1),
    'vqkd_encoder_base_decoder_3x768x12_clip': VQKDConfig(decoder_depth=3),
    'vqkd_encoder_base_decoder_1x768x12_dino': VQKDConfig(decoder_depth=1, teacher_dim=768),
    'vqkd_encoder_base_decoder_3x768x12_dino': VQKDConfig(decoder_depth=3, teacher_dim=768),  # ours
    'beitv2_base_patch16_224': BEiTConfig(),
    'beitv2_large_patch16_224': BEiTConfig(embed_dim=1024, depth=24, num_heads=16, layer_scale=1e-5,
                                           early_layers=21),
}


def classifier_config(cfg, num_classes, drop_path=0.1, img_size=None):
    """Fine-tuning ViT for a pretraining config: per-block relative position bias (initialised
    from the shared one), mean-pooled patch tokens with a fresh fc_norm, a linear head."""
    vit = {k: getattr(cfg, k) for k in ViTConfig.__dataclass_fields__}
    return ViTConfig(**dict(vit, rel_pos='per_block', fc_norm=True, num_classes=num_classes,
                            drop_path=drop_path, img_size=img_size or cfg.img_size))

# -------------------------------------------------------------------- backbone


def relative_position_index(h, w):
    """(hw+1, hw+1) index into the relative position bias table; token 0 is [CLS]. Patch pairs use
    (dy + h-1) * (2w-1) + (dx + w-1); the last 3 rows: [CLS]->patch, patch->[CLS], [CLS]->[CLS]
    (official)."""
    coords = torch.cartesian_prod(torch.arange(h), torch.arange(w)).T  # (2, hw): (y, x), row-major
    rel = coords[:, :, None] - coords[:, None, :]              # (2, hw, hw): query minus key
    T = (2 * h - 1) * (2 * w - 1) + 3                          # table rows
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + rel[1] + w - 1
    index[0, :], index[:, 0], index[0, 0] = T - 3, T - 2, T - 1
    return index


def add_rel_pos_table(module, grid, num_heads):
    """Register on `module`, under the official names, a learned bias per head and relative offset,
    zero at init. The index is derived from the grid, so it is not saved (as timm; official files
    save it)."""
    index = relative_position_index(*grid)
    module.relative_position_bias_table = nn.Parameter(  # (2h - 1)(2w - 1) + 3 rows
        torch.zeros(int(index.max()) + 1, num_heads))
    module.register_buffer('relative_position_index', index, persistent=False)


def pos_bias_from_table(module):
    """The (nh, N, N) bias added to the attention logits, read from `module`'s table. Contiguous:
    SDPA's fused CUDA kernels refuse a bias with a strided last dim (docs/speed.md)."""
    bias = module.relative_position_bias_table[module.relative_position_index]  # (N, N, nh)
    return bias.permute(2, 0, 1).contiguous()


def attention(q, k, v, bias=None, explicit=None):
    """softmax(q k^T / sqrt(hs) + bias) v for q (B, nh, Nq, hs), k and v (B, nh, N, hs), bias
    broadcastable to (B, nh, Nq, N). Two ways to compute the same thing, tested equal: the explicit
    maths and PyTorch's fused SDPA kernel. explicit=None picks by device: explicit on CPU, where it
    is the faster with a trainable bias, SDPA elsewhere (docs/speed.md)."""
    if explicit is None:
        explicit = q.device.type == 'cpu'
    if not explicit:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    return attention_probs(q, k, bias) @ v


def attention_probs(q, k, bias=None):  # (B, nh, Nq, N): attention's explicit maths, before v
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None  # BEiT: q and v biases,
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None  # no k bias
        self.proj = nn.Linear(dim, dim)
        self.has_table = grid is not None  # fine-tuning: each block has its own table
        if self.has_table:
            add_rel_pos_table(self, grid, num_heads)

    def heads(self, x):  # (B, N, C) -> q, k, v, each (B, nh, N, hs)
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).unflatten(-1, (3, self.num_heads, -1))
        return qkv.permute(2, 0, 3, 1, 4)

    def forward(self, x, pos_bias=None):  # pos_bias: the shared (nh, N, N) bias, if any
        if self.has_table:
            pos_bias = pos_bias_from_table(self)
        x = attention(*self.heads(x), pos_bias)                # (B, nh, N, hs)
        return self.proj(x.transpose(1, 2).flatten(2))  # (B, N, C)


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (gamma) and stochastic depth."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, layer_scale=0.0, drop_path=0.0,
                 grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()  # official names mlp.fc1 / mlp.fc2, exact (erf) GELU
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.drop_path = drop_path
        self.gamma_1 = self.gamma_2 = None  # layer scale: a learned per-channel gain on each branch
        if layer_scale > 0:
            self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim))

    def residual(self, x, branch, gamma):  # x + drop_path(gamma * branch)
        if gamma is not None:
            branch = gamma * branch
        return x + stochastic_depth(branch, self.drop_path, 'row', self.training)

    def forward(self, x, pos_bias=None):
        x = self.residual(x, self.attn(self.norm1(x), pos_bias), self.gamma_1)
        return self.residual(x, self.mlp(self.norm2(x)), self.gamma_2)


@torch.no_grad()
def trunc_normal_(t, std=0.02, cut=2.0):
    """N(0, std) cut to [-cut, cut] by resampling: timm's, in the official fine-tuning ViT, cuts at
    +-2 (+-100 std, no cut in practice); official pretraining at 1 std. The distribution of
    nn.init.trunc_normal_, not its random stream: kept, so that the seeded figures of docs/ stay."""
    flat = t.view(-1)
    flat.normal_(0, std)
    idx = (flat.abs() > cut).nonzero().squeeze(1)
    while idx.numel():
        v = torch.randn(idx.numel(), dtype=t.dtype, device=t.device) * std
        flat[idx] = v
        idx = idx[v.abs() > cut]
    return t


def init_linears_(module, std=0.02, cut=2.0, convs=False, skip=''):
    """Linear (and with convs=True Conv2d) weights trunc_normal(std, cut), biases 0, LayerNorm (1,
    0); submodules whose name starts with `skip` are left alone."""
    kinds = (nn.Linear, nn.Conv2d) if convs else nn.Linear
    for name, m in module.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(m, kinds):
            trunc_normal_(m.weight, std, cut)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rescale_blocks_(blocks, first_layer_id=1):
    """Official fix_init_weight: the residual outputs of layer l (1-based) divided by sqrt(2l)."""
    for i, blk in enumerate(blocks):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            w.data.div_(math.sqrt(2.0 * (first_layer_id + i)))


def block_index(layer, depth):
    """A block given as 0..depth-1, or -1 for the last, as 0..depth-1."""
    if not -depth <= layer < depth:
        raise ValueError(f'layer {layer}: the model has blocks 0..{depth - 1} (or -1 for the last)')
    return layer % depth


class ViT(nn.Module):
    """The ViT every stage uses: tokenizer encoder/decoder, pretraining backbone, classifier."""

    def __init__(self, cfg: ViTConfig, init=True):  # init=False: a subclass initialises it all
        super().__init__()
        self.cfg = cfg
        D, p = cfg.embed_dim, cfg.patch_size
        if D % cfg.num_heads or cfg.img_size % p:  # not whole patches: pixels would be lost
            raise ValueError(f'{cfg}: needs embed_dim % num_heads = 0 and '
                             'img_size % patch_size = 0')
        self.grid = (cfg.img_size // p,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = None
        if cfg.abs_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid) + 1, D))
        self.rel_pos_bias = None  # pretraining: one table for all blocks (the official name)
        if cfg.rel_pos == 'shared':
            self.rel_pos_bias = nn.Module()
            add_rel_pos_table(self.rel_pos_bias, self.grid, cfg.num_heads)
        per_block = self.grid if cfg.rel_pos == 'per_block' else None
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_scale, rate, per_block)
            for rate in dpr)
        self.norm = None if cfg.fc_norm else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if cfg.fc_norm else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else None
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Official fine-tuning / tokenizer init (modeling_finetune.py): Linear weights, cls_token,
        pos_embed trunc_normal(0.02); biases 0; LayerNorm (1, 0); block l's attn.proj, mlp.fc2 /
        sqrt(2l); head x 0.001."""
        init_linears_(self)
        trunc_normal_(self.cls_token)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed)
        rescale_blocks_(self.blocks)
        if self.head is not None:
            self.head.weight.mul_(0.001)
            self.head.bias.mul_(0.001)

    def shared_pos_bias(self):  # (nh, N, N) from the shared table, or None (per-block or no tables)
        return None if self.rel_pos_bias is None else pos_bias_from_table(self.rel_pos_bias)

    def patches(self, images):  # (B, 3, H, W) -> (B, n, D) patch embeddings, row-major
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def with_cls(self, x):  # (B, n, D) -> (B, N = 1 + n, D): [CLS] first, then the positions
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed

    def forward_tokens(self, images, layers=()):
        """All N tokens after the last block (no final norm), and those after each block (0-based)
        in `layers`."""
        x, pos_bias, taken = self.with_cls(self.patches(images)), self.shared_pos_bias(), {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, pos_bias)
            if i in layers:
                taken[i] = x
        return x, [taken[i] for i in layers]

    def final_norm(self, x):  # `norm` (pretraining), or `fc_norm` (classifier, tokenizer)
        return self.fc_norm(x) if self.norm is None else self.norm(x)

    def features(self, images, pool='cls', layer=-1):
        """(B, D): the [CLS] token (pool='cls') or the mean patch token ('mean') after block `layer`
        (0-based; -1 = the last, and then through the final norm): what the probes read."""
        layer = block_index(layer, self.cfg.depth)
        _, (x,) = self.forward_tokens(images, layers=(layer,))
        f = x[:, 0] if pool == 'cls' else x[:, 1:].mean(1)
        return self.final_norm(f) if layer == self.cfg.depth - 1 else f

    def forward_patch_tokens(self, images):  # (B, n, D), normalised; the tokenizer's encoder output
        return self.final_norm(self.forward_tokens(images)[0][:, 1:])

    def forward_features(self, images):  # (B, D): what a head reads (fc_norm: the mean patch token)
        return self.features(images, 'cls' if self.fc_norm is None else 'mean')

    def forward(self, images):  # (B, num_classes)
        if self.head is None:
            raise ValueError('this ViT has no classification head (num_classes=0): use features')
        return self.head(self.forward_features(images))

# -------------------------------------------------------------- stage 1: VQ-KD


def l2norm(t):
    return F.normalize(t, p=2, dim=-1)


def distributed():  # decided when a collective is about to run, not when a module is built
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def assigned_means(z, idx, old, sync):
    """The mean direction of the unit vectors z (M, d) that idx (M,) assigns to each row of old
    (K, d), all ranks' under DDP (with sync); a row given none keeps old's. -> (means, counts)"""
    counts = z.new_zeros(len(old)).index_add_(0, idx, z.new_ones(len(idx)))  # (K,), no sync
    sums = torch.zeros_like(old).index_add_(0, idx, z)        # (K, d)
    if sync and distributed():                                # every rank gets the same means
        dist.all_reduce(counts)
        dist.all_reduce(sums)
    means = l2norm(sums / counts.clamp(min=1)[:, None])
    return torch.where(counts[:, None] > 0, means, old), counts


@torch.no_grad()
def kmeans(z, K, means=None, sync=True):
    """Spherical k-means (cosine) on unit vectors z (M, d) -> (means, counts): initialises the
    codebook. Under DDP it clusters all ranks' vectors: rank 0's initial means (drawn from z unless
    given), all-reduced sums and counts, so every rank ends with the same codebook (the official
    code clusters each rank's batch alone)."""
    if z.shape[0] < K:  # checked on every rank (equal batches), so no rank waits forever
        raise ValueError(f'k-means init needs at least {K} vectors (the codebook size) per rank '
                         f'in the first batch, got {z.shape[0]}: raise batch_size or lower '
                         'codebook_size')
    if means is None:
        means = z[torch.randperm(z.shape[0], device=z.device)[:K]]
    if sync and distributed():
        dist.broadcast(means, 0)
    for _ in range(10):  # iterations
        idx = torch.cat([(c @ means.t()).argmax(1) for c in z.split(16384)])  # nearest by cosine
        means, counts = assigned_means(z, idx, means, sync)
    return means, counts


class NormEMACodebook(nn.Module):
    """K unit-norm codes of dimension d; lookup is the nearest code by cosine. The codes learn not
    by gradient but as an exponential moving average of the encoder outputs assigned to them
    (official NormEMAVectorQuantizer)."""
    sync = True  # all-reduce k-means and EMA statistics under DDP (a test switches it off)
    ready = False  # k-means has run or was loaded

    def __init__(self, K, d, decay=0.99, beta=1.0):
        super().__init__()
        self.K, self.decay, self.beta = K, decay, beta
        # official: a frozen Parameter (embedding.weight); a buffer says what it is
        self.register_buffer('weight', l2norm(torch.randn(K, d)))
        self.register_buffer('initted', torch.zeros(1))       # 1 once k-means has run
        self.register_buffer('cluster_size', torch.zeros(K))  # EMA of code counts: official, unread

    def distances(self, z):
        """(M, K) squared distances of unit z (M, d) to the codes, as the official code computes
        them. Between unit vectors |z - c|^2 = 2 - 2 cos(z, c): the nearest code is the paper's most
        similar by cosine."""
        return z.pow(2).sum(1, keepdim=True) + self.weight.pow(2).sum(1) - 2 * z @ self.weight.t()

    def lookup(self, z):
        """z: (B, n, d) task-layer output -> (l2-normalised z, codes (B, n)); no side effects."""
        with torch.autocast(z.device.type, enabled=False):    # codebook maths in fp32 (or fp64)
            z = l2norm(z.to(self.weight.dtype))
            return z, self.distances(z.flatten(0, 1)).argmin(1).view(z.shape[:-1])

    def forward(self, z):
        """-> (quantized z with straight-through gradients, codes, commitment loss); in training,
        k-means initialises the codes on the first batch, then every batch updates them (EMA)."""
        if self.training and not self.ready:  # `initted` is read once (a device sync)
            if not self.initted:
                self.init_codebook(l2norm(z.detach().to(self.weight.dtype)).flatten(0, 1))
            self.ready = True
        z, codes = self.lookup(z)
        with torch.autocast(z.device.type, enabled=False):
            z_q = self.weight[codes]                          # a copy: the update does not touch it
            if self.training:
                self.ema_update(z.detach().flatten(0, 1), codes.flatten())
            # the commitment term alone: the EMA update stands for the paper's codebook term
            loss = self.beta * F.mse_loss(z_q, z)
            return z + (z_q - z).detach(), codes, loss        # straight-through estimator

    @torch.compiler.disable
    @torch.no_grad()
    def init_codebook(self, z):
        self.weight.copy_(kmeans(z, self.K, sync=self.sync)[0])
        self.initted.fill_(1)

    @torch.compiler.disable
    @torch.no_grad()
    def ema_update(self, z, codes):                           # z: (M, d) unit vectors, codes: (M,)
        new, counts = assigned_means(z, codes, self.weight, self.sync)  # unused codes: as they are
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.weight.mul_(self.decay).add_(new, alpha=1 - self.decay)
        self.weight.copy_(l2norm(self.weight))                # back onto the unit sphere


def code_usage(counts):
    """counts: (K,) how often each code was given -> dict(codes used, their share of the codebook,
    perplexity: exp of the entropy of the code distribution, K when all are used equally)."""
    p = counts.double() / counts.sum().clamp(min=1)
    perplexity = torch.special.entr(p).sum().exp().item()  # entr: -p log p, 0 at 0
    used = int(counts.count_nonzero())
    return dict(codes_used=used, used_share=used / len(counts), perplexity=perplexity)


class VQKD(nn.Module):
    """Vector-quantized knowledge distillation (paper Sec. 2.2): encoder -> nearest code -> decoder,
    trained so that the decoder reproduces a teacher's patch features (B, n, teacher_dim), given to
    forward, from the codes."""

    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim  # both ViTs: absolute positions, no layer scale, fc_norm on the patches
        vit = dict(embed_dim=D, num_heads=cfg.num_heads, layer_scale=0, abs_pos_emb=True,
                   rel_pos='none', fc_norm=True)
        self.encoder = ViT(ViTConfig(img_size=cfg.img_size, patch_size=cfg.patch_size,
                                     depth=cfg.depth, **vit))
        self.grid = self.encoder.grid
        # the decoder's "image" is the (d, h, w) map of the codes, embedded by a 1x1 conv
        self.decoder = ViT(ViTConfig(img_size=self.grid[0], patch_size=1, in_chans=cfg.code_dim,
                                     depth=cfg.decoder_depth, **vit))
        self.checked_values = False  # on a GPU encode reads the values of the first batch only
        self.quantize = NormEMACodebook(cfg.codebook_size, cfg.code_dim, cfg.decay, cfg.beta)
        # not in the paper's text, as in the official code: an MLP from the encoder's width to the
        # codes' (and, in the decoder, to the teacher's)
        self.encode_task_layer, self.decode_task_layer = (
            nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, out))
            for out in (cfg.code_dim, cfg.teacher_dim))
        init_linears_(self.encode_task_layer)
        init_linears_(self.decode_task_layer)

    def code_vectors(self, images):  # images in [0, 1] -> (B, n, code_dim), not yet normalised
        x = self.encoder.forward_patch_tokens(images * 2 - 1)  # official: [0, 1] -> [-1, 1]
        with torch.autocast(x.device.type, enabled=False):      # official: task layer in fp32
            return self.encode_task_layer(x.to(self.encode_task_layer[0].weight.dtype))

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, H, W) in [0, 1] -> codes (B, n) int64, row-major patch order. No codebook
        statistics, no collectives (the official eval forward all-reduces usage counts). Checks the
        shape on every call, the values on every call on the CPU, on the first only on a GPU
        (reading them there would make each step wait)."""
        S = self.cfg.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f'encode expects images of shape (B, 3, {S}, {S}), '
                             f'got {tuple(images.shape)}')
        if images.device.type == 'cpu' or not self.checked_values:
            lo, hi = images.aminmax()
            if not (lo >= -0.01 and hi <= 1.01):  # NaN fails too
                raise ValueError(f'encode expects finite RGB values in [0, 1] (as ToTensor gives), '
                                 f'got [{lo:.3g}, {hi:.3g}]: non-finite, ImageNet-normalised or '
                                 '0-255 input?')
            self.checked_values = True
        z = self.code_vectors(images.to(self.encode_task_layer[0].weight.dtype))
        return self.quantize.lookup(z)[1]

    def decode(self, z_q):  # z_q: (B, n, code_dim) -> (B, n, teacher_dim)
        B, n, d = z_q.shape
        code_map = z_q.transpose(1, 2).reshape(B, d, *self.grid)  # (B, d, h, w)
        return self.decode_task_layer(self.decoder.forward_patch_tokens(code_map))

    def forward(self, images, teacher_features=None):
        """-> (reconstruction, codes, losses or None): loss = mean(1 - cos(reconstruction, teacher))
        + commitment."""
        z_q, codes, quant_loss = self.quantize(self.code_vectors(images))
        rec = self.decode(z_q)
        if teacher_features is None:
            return rec, codes, None
        rec_loss = (1 - (l2norm(rec) * l2norm(teacher_features.to(rec.dtype))).sum(-1)).mean()
        return rec, codes, dict(loss=rec_loss + quant_loss, rec_loss=rec_loss,
                                quant_loss=quant_loss)

# ---------------------------------------------------------------- stage 2: MIM


class MaskingGenerator:
    """Block-wise masking (BEiT, official masking_generator.py): rectangles of at least
    `min_num_patches` patches, aspect ratio in [0.3, 1/0.3], until the count is reached; then random
    patches are masked so that exactly `num_masking_patches` are. Defaults: the paper's 75 of
    196 (14x14) in blocks of 16, scaled to other grids."""

    def __init__(self, grid, num_masking_patches=None, min_num_patches=None, max_num_patches=None,
                 min_aspect=0.3):
        self.h, self.w = grid
        n = self.h * self.w
        self.num = round(n * 75 / 196) if num_masking_patches is None else num_masking_patches
        self.min_num = max(2, round(16 * n / 196)) if min_num_patches is None else min_num_patches
        self.max_num = self.num if max_num_patches is None else max_num_patches
        possible = 0 <= self.num <= n and 1 <= self.min_num <= self.max_num and 0 < min_aspect <= 1
        if not possible or self.num % 1:
            raise ValueError(f'cannot mask {self.num} of {n} patches in blocks of {self.min_num} '
                             f'to {self.max_num}, aspect ratio >= {min_aspect}: need a whole count '
                             f'<= {n}, 1 <= min <= max, 0 < aspect <= 1')
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _block(self, mask, max_patches, rng):
        for _ in range(10):
            area = rng.uniform(self.min_num, max_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < self.w and h < self.h:
                top, left = rng.randint(0, self.h - h), rng.randint(0, self.w - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_patches:
                    block.fill(True)
                    return new
        return 0

    def __call__(self, rng=random):
        """-> (h*w,) bool, True = masked (replaced by mask_token and predicted), row-major."""
        mask = np.zeros((self.h, self.w), dtype=bool)  # numpy: cheaper than torch's small ops
        count = 0
        while count < self.num:
            delta = self._block(mask, min(self.num - count, self.max_num), rng)
            if delta == 0:
                break
            count += delta
        flat = mask.reshape(-1)
        if count < self.num:  # official: random single patches make up the exact count (a block
            # never adds more than is missing, so the official branch that unmasks never runs)
            flat[rng.sample(list(np.flatnonzero(~flat)), self.num - count)] = True
        return torch.from_numpy(flat)


def masked_rows(x, mask, num_masked=None):
    """x (B, n, ...) -> (M, ...): the masked rows, image by image. x[mask] (official) takes any
    mask, but a compiled step breaks and waits for the host there; with num_masked = R, every
    image's count, a fixed-size gather instead."""
    if num_masked is None:
        return x[mask]
    torch._assert_async((mask.sum(1) == num_masked).all(),
                        "num_masked is not every image's masked count")
    order = mask.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
    index = order[:, :num_masked]                             # (B, R): the masked, row-major
    index = index.reshape(index.shape + (1,) * (x.dim() - 2))  # (B, R, 1, ...): broadcasts
    return torch.take_along_dim(x, index, dim=1).flatten(0, 1)


class BEiTv2(ViT):
    """Masked image modeling with a [CLS] patch-aggregation head (paper Sec. 2.3, Fig. 3). Main
    branch (mim): predict the tokenizer's code of every masked patch from the last layer. [CLS] head
    (cls): the last layer's [CLS] + the patch tokens after block `early_layers` go through
    `head_layers` fresh blocks and the same norm and lm_head, predicting the same codes: [CLS] must
    gather the image's content."""

    def __init__(self, cfg: BEiTConfig):
        if cfg.rel_pos != 'shared' or cfg.fc_norm:  # the head's blocks read the table and `norm`
            raise ValueError(f"BEiTv2 needs rel_pos='shared' and fc_norm=False, got "
                             f'{cfg.rel_pos!r}, {cfg.fc_norm}')
        if cfg.head_layers and not 1 <= cfg.early_layers <= cfg.depth:
            raise ValueError(f'early_layers={cfg.early_layers}: the [CLS] head reads a block '
                             f'1..depth={cfg.depth}')
        super().__init__(cfg, init=False)  # initialised below, once the heads exist
        D = cfg.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.lm_head = nn.Linear(D, cfg.vocab_size)
        # official: drop path grows over max(depth, early_layers + head_layers) blocks; the head's
        # blocks take the rates after block early_layers
        rates = max(cfg.depth, cfg.early_layers + cfg.head_layers)
        dpr = torch.linspace(0, cfg.drop_path, rates).tolist()[cfg.early_layers:]
        self.cls_pt_layers = nn.ModuleList(  # official name; shares rel_pos_bias, norm and lm_head
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_scale, dpr[i])
            for i in range(cfg.head_layers))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Official pretraining init (modeling_pretrain.py): trunc_normal(0.02, cut at 1 std) for
        Linear and patch conv weights, cls_token, mask_token; biases 0; LayerNorm (1, 0); block l's
        attn.proj, mlp.fc2 / sqrt(2l). The [CLS] head blocks keep PyTorch's init (built after the
        official init pass), rescaled."""
        init_linears_(self, 0.02, cut=0.02, convs=True, skip='cls_pt_layers')
        trunc_normal_(self.cls_token, 0.02, cut=0.02)
        trunc_normal_(self.mask_token, 0.02, cut=0.02)
        rescale_blocks_(self.blocks)
        rescale_blocks_(self.cls_pt_layers, self.cfg.early_layers + 1)

    def embed_masked(self, images, mask):
        """(B, N, D): the patch embeddings, the masked ones (mask (B, n) bool, True = masked)
        replaced by the learned mask_token, then [CLS] in front."""
        n = math.prod(self.grid)
        if mask.dtype != torch.bool or mask.shape != (images.shape[0], n):
            raise ValueError(f'mask must be a bool tensor of shape (B, {n}), True = masked; '
                             f'got {mask.dtype} {tuple(mask.shape)}')
        x = self.patches(images)
        w = mask.unsqueeze(-1).type_as(x)
        return self.with_cls(x * (1 - w) + self.mask_token * w)

    def branches(self, images, mask):
        """Each branch's tokens before the final norm, (B, N, D): {'mim': the last layer, 'cls': the
        [CLS] head's output} ('cls' only with head layers). The official forward_features."""
        pos_bias = self.shared_pos_bias()                  # (nh, N, N): one table for every block
        x = self.embed_masked(images, mask)
        for i, blk in enumerate(self.blocks):
            x = blk(x, pos_bias)
            if i + 1 == self.cfg.early_layers:
                early = x                                  # the patch tokens the [CLS] head reads
        out = {'mim': x}
        if self.cls_pt_layers:
            h = torch.cat([x[:, :1], early[:, 1:]], dim=1)  # last-layer [CLS] + early patch tokens
            for blk in self.cls_pt_layers:
                h = blk(h, pos_bias)
            out['cls'] = h
        return out

    def forward(self, images, mask, targets=None, num_masked=None):
        """images (B, 3, H, W) ImageNet-normalised; mask (B, n) bool, True = masked; targets (B, n)
        the tokenizer's codes; num_masked: every image's masked count, when equal (static shapes:
        masked_rows). -> logits {'mim', 'cls'}, each (M, vocab) for the M masked patches in
        row-major order, and losses {'loss_mim', 'loss_cls', 'loss': their sum} or None (the
        official loss_1, loss_2, loss)."""
        if num_masked == 0 or (num_masked is None and not mask.any()):  # the loss would be NaN
            raise ValueError('the mask has no masked patch: nothing to predict')
        logits = {}
        for name, x in self.branches(images, mask).items():  # both branches: the same norm and head
            logits[name] = self.lm_head(self.norm(masked_rows(x[:, 1:], mask, num_masked)))
        if targets is None:
            return logits, None
        labels = masked_rows(targets, mask, num_masked)    # (M,): the codes of the masked patches
        losses = {f'loss_{name}': F.cross_entropy(lg, labels) for name, lg in logits.items()}
        return logits, dict(losses, loss=sum(losses.values()))

# ----------------------------------------------------------------- checkpoints


def load_file(path):
    """torch.load that runs no code (weights_only); the official files' `args` (a Namespace)
    allowed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def state_dict_of(ckpt):
    """The weights in a checkpoint: 'model' (ours, official pretraining), 'module' (official
    fine-tuned), 'state_dict' (mmseg), or the checkpoint itself when it is one."""
    if isinstance(ckpt, dict):
        for key in ('model', 'module', 'state_dict'):
            if isinstance(ckpt.get(key), dict):
                return ckpt[key]
        if all(torch.is_tensor(v) for v in ckpt.values()):
            return ckpt
    raise ValueError("no state dict found (expected a 'model', 'module' or 'state_dict' entry)")


PRETRAIN_ONLY = ('mask_token', 'lm_head', 'norm', 'cls_pt_layers')  # dropped when fine-tuning


def spline_weights(x, u):
    """(len(u), len(x)) weights W: W @ y is the cubic spline through the points (x, y), read at u
    (clamped to [x[0], x[-1]], as FITPACK reads it). Its knots are x[2:-2] (not-a-knot ends): the
    spline FITPACK's interpolation (s=0) computes. Built in the basis 1, t, t^2, t^3, (t - knot)^3
    for t past each knot, on x scaled to [-1, 1]: within 1e-10 of FITPACK's on the tables the tests
    resize."""
    scale = x[-1]
    x, u = x / scale, u.clamp(x[0], x[-1]) / scale
    knots = x[2:-2]

    def basis(t):  # (len(t), len(x))
        powers = t[:, None] ** torch.arange(4)
        return torch.cat([powers, ((t[:, None] - knots).clamp(min=0) / (1 - knots)) ** 3], 1)
    return torch.linalg.solve(basis(x).T, basis(u).T).T


def resize_rel_pos_table(table, dst_rows):
    """Official fine-tuning resize of a relative position table to another grid: source offsets on a
    geometric progression, a bicubic interpolating spline read at integer offsets, the last 3 rows
    kept. The official scipy interp2d(kind='cubic') is FITPACK's interpolating spline:
    spline_weights along each axis."""
    src, dst = math.isqrt(table.shape[0] - 3), math.isqrt(dst_rows - 3)
    lo, hi = 1.01, 1.5  # bisection for q with sum_{k < src/2} q^k = dst/2 (official)
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** (src // 2)) / (1 - q) > dst // 2 else (q, hi)
    dis = [sum(q ** k for k in range(i + 1)) for i in range(src // 2)]
    x = torch.tensor([-d for d in reversed(dis)] + [0] + dis, dtype=torch.float64)  # source offsets
    u = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)  # target offsets
    W = spline_weights(x, u)                                   # (dst, src)
    grids = table[:-3].double().cpu().T.reshape(-1, src, src)  # (nh, src, src), rows dy
    out = (W @ grids @ W.T).reshape(-1, dst * dst)              # (nh, dst * dst)
    return torch.cat([out.T.to(table), table[-3:]])


def resize_pos_embed(v, rows):
    """(1, 1 + s*s, D) absolute position embedding -> (1, rows, D): bicubic over the grid
    (official)."""
    s, d = math.isqrt(v.shape[1] - 1), math.isqrt(rows - 1)
    g = v[:, 1:].reshape(1, s, s, -1).permute(0, 3, 1, 2).float()       # (1, D, s, s)
    g = F.interpolate(g, size=(d, d), mode='bicubic')  # align_corners=False
    return torch.cat([v[:, :1], g.permute(0, 2, 3, 1).flatten(1, 2).to(v.dtype)], dim=1)


def load_state(model, sd, ignore=()):
    """Strictly load a state dict in our, the official or timm's layout into `model`. `ignore`: key
    prefixes that may be absent from the model (dropped) or from sd (left at init), e.g.
    PRETRAIN_ONLY + ('fc_norm', 'head') to fine-tune from a pretraining file. Every shape that
    cannot fit is named first; position tables and embeddings of another grid are then resized, as
    the official code does. relative_position_index buffers are derived: absent is fine, present
    ones must match."""
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError('load_state takes a state dict (name -> tensor); of a whole checkpoint: '
                         'state_dict_of(ckpt)')
    own, buffers = model.state_dict(), dict(model.named_buffers())
    rename = {'quantize.embedding.weight': 'quantize.weight',
              'quantize.embedding.initted': 'quantize.initted'}
    unread = ('quantize.embedding.cluster_size', 'quantize.embedding.embed_avg')  # officially too
    sd = {rename.get(k, k): v for k, v in sd.items()
          if not k.startswith(('teacher', 'scaling', 'loss')) and k not in unread}
    shared = sd.pop('rel_pos_bias.relative_position_bias_table', None)
    for k in own:  # pretraining -> fine-tuning: every block's table starts from the shared one
        if shared is not None and k.endswith('relative_position_bias_table'):
            sd[k] = shared.clone()
    index = {k: sd.pop(k) for k in list(sd) if k.endswith('relative_position_index')}

    def kept(k):
        return not any(k == p or k.startswith(p + '.') for p in ignore)

    def regrid(k):  # a position table or embedding of another grid, at the same width: resized
        grid = k.endswith(('relative_position_bias_table', 'pos_embed'))
        return grid and sd[k].shape != own[k].shape and sd[k].shape[-1] == own[k].shape[-1]
    missing = [k for k in own if k not in sd and kept(k)]
    unexpected = [k for k in sd if k not in own and kept(k)]
    wrong = [f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}' for k in sd
             if k in own and kept(k) and sd[k].shape != own[k].shape and not regrid(k)]
    if missing or unexpected or wrong:
        raise KeyError(f'state dict does not fit {type(model).__name__}: missing {missing[:8]}, '
                       f'unexpected {unexpected[:8]}, wrong shape {wrong[:8]}')
    for k in [k for k in sd if k in own and regrid(k)]:
        if k.endswith('pos_embed'):
            sd[k] = resize_pos_embed(sd[k], own[k].shape[1])
        else:
            sd[k] = resize_rel_pos_table(sd[k], own[k].shape[0])
            index.pop(k.replace('bias_table', 'index'), None)  # the file's index is of its own grid
    for k, v in index.items():
        if k in buffers and not torch.equal(v.to(buffers[k]), buffers[k]):
            raise ValueError(f'{k}: relative_position_index differs from the one of this grid')
    model.load_state_dict({k: v for k, v in sd.items() if k in own and v.shape == own[k].shape},
                          strict=False)
    return model


def export_state(model):
    """Our model's weights in the official layout: what the official code loads, with the
    relative_position_index buffers it saves. (A classifier's state_dict() is timm's layout.)"""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in model.named_buffers():
        if k.endswith('relative_position_index'):
            sd[k] = v.clone()
    if isinstance(model, VQKD):
        sd['quantize.embedding.weight'] = sd.pop('quantize.weight')
        sd['quantize.embedding.initted'] = sd.pop('quantize.initted')
        # two more the official code saves and never reads
        sd['quantize.embedding.cluster_size'] = torch.zeros_like(model.quantize.cluster_size)
        sd['quantize.embedding.embed_avg'] = model.quantize.weight.clone()
    return sd


def count_blocks(sd, prefix=''):  # the blocks a state dict holds under prefix ('', 'encoder.', ...)
    return len({k[len(prefix):].split('.')[1] for k in sd if k.startswith(prefix + 'blocks.')})


def vit_config_from_state(sd):
    """ViTConfig of a backbone state dict (ours, official or timm's), read off its shapes. The heads
    are counted off a relative position table, else taken as 64 channels wide (as in every official
    model)."""
    D, _, p, _ = sd['patch_embed.proj.weight'].shape
    cfg = ViTConfig(patch_size=p, embed_dim=D, depth=count_blocks(sd), num_heads=D // 64,
                    layer_scale=0.1 if 'blocks.0.gamma_1' in sd else 0.0,
                    num_classes=len(sd.get('head.weight', ())),
                    abs_pos_emb='pos_embed' in sd, rel_pos='none', fc_norm='norm.weight' not in sd)
    if 'pos_embed' in sd:
        cfg.img_size = p * math.isqrt(sd['pos_embed'].shape[1] - 1)
    for name, rel_pos in (('rel_pos_bias.', 'shared'), ('blocks.0.attn.', 'per_block')):
        table = sd.get(name + 'relative_position_bias_table')
        if table is not None:  # (2g - 1)^2 + 3 rows for a g x g grid, a column per head
            cfg.rel_pos, cfg.num_heads = rel_pos, table.shape[1]
            cfg.img_size = p * (math.isqrt(table.shape[0] - 3) + 1) // 2
    return cfg


def backbone_config(ckpt):
    """The ViTConfig of a backbone checkpoint: ours save it, the others' is read off their
    shapes."""
    saved = ckpt.get('model_config')
    if isinstance(saved, dict):
        return ViTConfig(**{k: v for k, v in saved.items() if k in ViTConfig.__dataclass_fields__})
    return vit_config_from_state(state_dict_of(ckpt))


def load_backbone(ckpt, num_classes=0, **changes):
    """The ViT of any backbone file: ours (pretraining or fine-tuning), the official pretraining or
    fine-tuned files, timm's; a path or what load_file read. Its config comes from the file (ours
    saves it) or off its shapes, then `changes` not None (img_size: position tables resized;
    drop_path; num_heads where the file cannot say). num_classes > 0: a classifier, as the official
    fine-tuning builds it from any of them: a position table per block (from the shared one), the
    mean patch token through fc_norm, a head (fresh unless the file has one of that size). Strict:
    only what the model does not use of the file (the pretraining heads, a final norm or head it
    lacks), and a fresh fc_norm or head, are let go."""
    ckpt = ckpt if isinstance(ckpt, dict) else load_file(ckpt)
    sd = state_dict_of(ckpt)
    if 'encoder.patch_embed.proj.weight' in sd:
        raise ValueError('a tokenizer, not a backbone (load_tokenizer reads it)')
    if 'patch_embed.proj.weight' not in sd:
        raise ValueError('no ViT weights in it (no patch_embed.proj.weight)')
    cfg = backbone_config(ckpt)
    if num_classes:
        cfg = replace(cfg, rel_pos='per_block', fc_norm=True, num_classes=num_classes)
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    ignore = ['mask_token', 'lm_head', 'cls_pt_layers']
    if cfg.fc_norm:
        ignore.append('norm' if 'fc_norm.weight' in sd else 'norm fc_norm')
    if sd.get('head.weight', torch.empty(0)).shape[:1] != (cfg.num_classes,):
        ignore.append('head')  # none in the model, or a fresh one
    return load_state(ViT(cfg), sd, ignore=' '.join(ignore).split())


def vqkd_config_from_state(sd):
    """VQKDConfig of an official tokenizer state dict, read off its shapes (64-dim heads
    assumed)."""
    D, _, p, _ = sd['encoder.patch_embed.proj.weight'].shape
    grid = math.isqrt(sd['encoder.pos_embed'].shape[1] - 1)
    K, d = sd['quantize.embedding.weight'].shape
    return VQKDConfig(img_size=grid * p, patch_size=p, embed_dim=D, num_heads=D // 64,
                      depth=count_blocks(sd, 'encoder.'),
                      decoder_depth=count_blocks(sd, 'decoder.'), codebook_size=K, code_dim=d,
                      teacher_dim=sd['decode_task_layer.2.weight'].shape[0])


def load_tokenizer(ckpt):
    """A frozen VQKD in eval mode from a checkpoint (a path, or what load_file read): ours stores
    its config; an official file's (vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth) is read
    off the shapes."""
    ckpt = ckpt if isinstance(ckpt, dict) else load_file(ckpt)
    sd = state_dict_of(ckpt)
    if 'quantize.weight' not in sd and 'quantize.embedding.weight' not in sd:
        what = 'not one'
        if 'patch_embed.proj.weight' in sd:
            what = 'a backbone (pretraining or fine-tuning) checkpoint'
        raise ValueError(f'not a tokenizer checkpoint (no codebook in it): {what}')
    saved = ckpt.get('model_config')
    cfg = VQKDConfig(**saved) if isinstance(saved, dict) else vqkd_config_from_state(sd)
    return load_state(VQKD(cfg), sd).eval().requires_grad_(False)
