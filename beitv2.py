"""BEiT v2 in one file: ViT backbone, VQ-KD tokenizer, masked image modeling with a [CLS] head.

Paper: Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers",
https://arxiv.org/abs/2208.06366. Official code: github.com/microsoft/unilm, folder beit2/.
Stage 1 (train_tokenizer.py): VQKD learns 8192 codes by regressing a teacher's (CLIP) features.
Stage 2 (pretrain.py): BEiTv2 predicts the codes of ~40% block-masked patches.
Stage 3 (evaluate.py): linear probe / fine-tune / segment with the backbone.
Read top to bottom; each section only uses what is above it, except BEiTv2.forward's speed path,
fenced in its own section right after it. Imports torch only.
Parameter names are the official (and timm) ones, so official weights load with a short filter.
"""
import argparse
import math
import os
import pickle
import random
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- configs


@dataclass
class ViTConfig:
    """rel_pos: one relative position table shared by all blocks (pretraining), one per block
    (fine-tuning), or none (the tokenizer's ViTs, which have absolute position embeddings).
    fc_norm: the official layout switch: the final LayerNorm is `fc_norm` and normalises patch
    tokens (mean-pooled by a classifier; the tokenizer's patch features); else `norm` on all tokens,
    [CLS] pooled."""
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
    rel_pos: str = 'shared'       # relative position tables: 'shared', 'per_block' or 'none'
    fc_norm: bool = False         # True: final norm `fc_norm` on patch tokens; False: `norm`, [CLS]
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
    'vqkd_demo': VQKDConfig(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, decoder_depth=1,
                            codebook_size=512, code_dim=16),  # the quick start's, 2-core CPU minutes
    'beitv2_demo': BEiTConfig(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                              early_layers=4, vocab_size=512),
    'beitv2_tiny_patch16_224': BEiTConfig(embed_dim=192, num_heads=3),  # bench.py's CPU size (ViT-Tiny)
    'vqkd_encoder_base_decoder_1x768x12_clip': VQKDConfig(decoder_depth=1),
    'vqkd_encoder_base_decoder_3x768x12_clip': VQKDConfig(decoder_depth=3),
    'vqkd_encoder_base_decoder_1x768x12_dino': VQKDConfig(decoder_depth=1, teacher_dim=768),
    'vqkd_encoder_base_decoder_3x768x12_dino': VQKDConfig(decoder_depth=3, teacher_dim=768),  # not released
    'beitv2_base_patch16_224': BEiTConfig(),
    'beitv2_large_patch16_224': BEiTConfig(embed_dim=1024, depth=24, num_heads=16,
                                           layer_scale=1e-5, early_layers=21),
}


def classifier_config(cfg, num_classes, drop_path=0.1, img_size=None):
    """Fine-tuning ViT for a pretraining config: per-block relative position bias (initialised
    from the shared one), mean-pooled patch tokens with a fresh fc_norm, a linear head."""
    keys = ViTConfig.__dataclass_fields__
    vit = {k: getattr(cfg, k) for k in keys}
    vit.update(rel_pos='per_block', fc_norm=True, num_classes=num_classes,
               drop_path=drop_path, img_size=img_size or cfg.img_size)
    return ViTConfig(**vit)


RENAMED = {'rel_pos_bias': 'rel_pos', 'mean_pooling': 'fc_norm', 'n_embed': 'codebook_size'}


def current_names(saved):
    """A config dict saved in one of our checkpoints (asdict), with the field names of ours written
    before c69103e read as today's."""
    return {RENAMED.get(k, k): v for k, v in saved.items()}

# ----------------------------------------------------------------------------- backbone


def relative_position_index(h, w):
    """(hw+1, hw+1) index into the relative position bias table; token 0 is [CLS].
    Patch pairs use (dy + h-1) * (2w-1) + (dx + w-1); the last 3 table rows are
    [CLS]->patch, patch->[CLS], [CLS]->[CLS] (official layout, so official tables load)."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]              # (2, hw, hw): query minus key
    T = (2 * h - 1) * (2 * w - 1) + 3                          # table rows
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + rel[1] + w - 1
    index[0, :], index[:, 0], index[0, 0] = T - 3, T - 2, T - 1
    return index


def add_rel_pos_table(module, grid, num_heads):
    """Register a learned bias per head and relative offset (added to the attention logits) on
    `module` under the official names. The index is derived from the grid, so it is not saved
    (timm does the same; the official files save it)."""
    h, w = grid
    rows = (2 * h - 1) * (2 * w - 1) + 3
    module.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))  # official: 0
    index = relative_position_index(h, w)
    module.register_buffer('relative_position_index', index, persistent=False)


def pos_bias_from_table(module):
    """The (nh, N, N) bias added to the attention logits, read from `module`'s table. Contiguous:
    SDPA's memory-efficient CUDA kernel refuses a bias with a strided last dim and falls back to the
    fp32 maths (ViT-B pretraining step 116 instead of 81 ms on an H200, measured)."""
    return module.relative_position_bias_table[module.relative_position_index].permute(2, 0, 1).contiguous()


class RelativePositionBias(nn.Module):
    """The table shared by all blocks in pretraining (official name `rel_pos_bias`)."""

    def __init__(self, grid, num_heads):
        super().__init__()
        add_rel_pos_table(self, grid, num_heads)

    def forward(self):
        return pos_bias_from_table(self)


def attention(q, k, v, bias=None, explicit=None):
    """softmax(q k^T / sqrt(hs) + bias) v for q (B, nh, Nq, hs), k and v (B, nh, N, hs), bias
    broadcastable to (B, nh, Nq, N). Two ways to compute the same thing, tested equal on CPU
    (and on CUDA by gpu_check.sh): the explicit maths, and PyTorch's fused SDPA kernel.
    explicit=None picks by device: measured (2-core CPU, ViT-Tiny attention fwd+bwd) explicit
    7.9 vs SDPA 8.2 ms with a trainable bias in fp32, 4.2 vs 8.4 ms in bf16; on a GPU SDPA."""
    if explicit is None:
        explicit = q.device.type == 'cpu'
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nh, Nq, N)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


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
        B, N, C = x.shape
        qkv_bias = None if self.q_bias is None else \
            torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(B, N, 3, self.num_heads, C // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4)

    def forward(self, x, pos_bias=None):  # pos_bias: the shared (nh, N, N) bias, if any
        B, N, C = x.shape
        q, k, v = self.heads(x)
        if self.has_table:
            pos_bias = pos_bias_from_table(self)
        x = attention(q, k, v, pos_bias)                       # (B, nh, N, hs)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if p == 0.0 or not training:
        return x
    survives = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p)
    return x * survives / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (gamma) and stochastic depth."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, layer_scale=0.0,
                 drop_path=0.0, grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()  # official names mlp.fc1 / mlp.fc2, exact (erf) GELU
        self.mlp.fc1, self.mlp.act = nn.Linear(dim, hidden), nn.GELU()
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.drop_path = drop_path
        if layer_scale > 0:
            self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, pos_bias=None):
        a = self.scaled(self.gamma_1, self.attn(self.norm1(x), pos_bias))
        x = x + drop_path(a, self.drop_path, self.training)
        m = self.scaled(self.gamma_2, self.mlp(self.norm2(x)))
        return x + drop_path(m, self.drop_path, self.training)

    @staticmethod
    def scaled(gamma, branch):  # layer scale: a learned per-channel gain on each residual branch
        return branch if gamma is None else gamma * branch


@torch.no_grad()
def trunc_normal_(t, std=0.02, cut=2.0):
    """N(0, std) truncated to [-cut, cut], by resampling (nn.init.trunc_normal_'s erfinv took 30 s
    for ViT-L on CPU). timm's, used by the official fine-tuning ViT, cuts at +-2 absolute, i.e.
    +-100 std: untruncated in practice; the official pretraining model cuts at +-1 std."""
    flat = t.view(-1)
    flat.normal_(0, std)
    idx = (flat.abs() > cut).nonzero().squeeze(1)
    while idx.numel():
        v = torch.randn(idx.numel(), dtype=t.dtype, device=t.device) * std
        flat[idx] = v
        idx = idx[v.abs() > cut]
    return t


def reset_layer_norm_(m):
    nn.init.ones_(m.weight)
    nn.init.zeros_(m.bias)


def rescale_blocks_(blocks, first_layer_id=1):
    """Official fix_init_weight: the residual outputs of layer l (1-based) divided by sqrt(2l)."""
    for i, blk in enumerate(blocks):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            w.data.div_(math.sqrt(2.0 * (first_layer_id + i)))


class ViT(nn.Module):
    """The ViT every stage uses: tokenizer encoder/decoder, pretraining backbone, classifier."""

    def __init__(self, cfg: ViTConfig, init=True):  # init=False: a subclass initialises it all later
        super().__init__()
        self.cfg = cfg
        D, p = cfg.embed_dim, cfg.patch_size
        self.grid = (cfg.img_size // p, cfg.img_size // p)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        n = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, D)) if cfg.abs_pos_emb else None
        shared = cfg.rel_pos == 'shared'
        self.rel_pos_bias = RelativePositionBias(self.grid, cfg.num_heads) if shared else None
        per_block = self.grid if cfg.rel_pos == 'per_block' else None
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_scale, dpr[i], per_block)
            for i in range(cfg.depth))
        self.norm = None if cfg.fc_norm else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if cfg.fc_norm else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else None
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_scale=0.001):
        """Official fine-tuning / tokenizer init (modeling_finetune.py):
        Linear weights, cls_token, pos_embed: trunc_normal(0.02); biases 0; LayerNorm (1, 0);
        patch conv: PyTorch default; attn.proj, mlp.fc2 of block l divided by sqrt(2l);
        relative position tables 0; head weight and bias times init_scale."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                reset_layer_norm_(m)
        trunc_normal_(self.cls_token)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed)
        rescale_blocks_(self.blocks)
        if self.head is not None:
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    def shared_pos_bias(self):  # (nh, N, N) from the shared table, or None (per-block or no tables)
        return None if self.rel_pos_bias is None else self.rel_pos_bias()

    def patches(self, images):  # (B, 3, H, W) -> (B, n, D) patch embeddings, row-major
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def with_cls(self, x):  # (B, n, D) -> (B, N = 1 + n, D): [CLS] first, then the position embedding
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed

    def embed(self, images):
        return self.with_cls(self.patches(images))

    def forward_tokens(self, images, layers=()):
        """All N tokens after the last block (no final norm), and the tokens after each block
        index (0-based) in `layers`: linear probing and segmentation read these."""
        x = self.embed(images)
        pos_bias = self.shared_pos_bias()
        taken = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, pos_bias)
            if i in layers:
                taken[i] = x
        return x, [taken[i] for i in layers]

    def forward_features(self, images):  # (B, D): fc_norm(mean of patch tokens) or norm([CLS])
        x, _ = self.forward_tokens(images)
        return self.fc_norm(x[:, 1:].mean(1)) if self.norm is None else self.norm(x[:, 0])

    def forward_patch_tokens(self, images):  # (B, n, D), normalised; the tokenizer's encoder output
        x, _ = self.forward_tokens(images)
        return (self.fc_norm if self.norm is None else self.norm)(x[:, 1:])

    def forward(self, images):
        if self.head is None:
            raise ValueError('this ViT has no classification head (num_classes=0): use forward_features')
        return self.head(self.forward_features(images))

# ----------------------------------------------------------------------------- stage 1: VQ-KD


def l2norm(t):
    return F.normalize(t, p=2, dim=-1)


def distributed():
    """Decided when a collective is about to run, not when a module is built."""
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def kmeans(z, K, iters=10, means=None, sync=True, chunk=16384):
    """Spherical k-means (cosine) on unit vectors z (M, d): initialises the codebook.
    Under DDP the Lloyd iterations run over all ranks' vectors: the initial means are drawn on
    rank 0 and broadcast, and per-code sums and counts are all-reduced, so every rank ends with
    the same codebook (the official code clusters each rank's batch alone). Returns (means, counts)."""
    ddp = sync and distributed()
    if means is None:
        if z.shape[0] < K:  # checked on every rank (equal batches), so no rank waits forever
            raise ValueError(f'k-means init needs at least {K} vectors (the codebook size) per '
                             f'rank in the first batch, got {z.shape[0]}: raise batch_size or lower codebook_size')
        if not ddp or dist.get_rank() == 0:
            means = z[torch.randperm(z.shape[0], device=z.device)[:K]]
        else:
            means = z.new_empty(K, z.shape[1])
        if ddp:
            dist.broadcast(means, 0)
    for _ in range(iters):
        idx = torch.cat([(c @ means.t()).argmax(1) for c in z.split(chunk)])  # nearest by cosine
        counts = torch.bincount(idx, minlength=K).to(z.dtype)
        sums = torch.zeros_like(means).index_add_(0, idx, z)
        if ddp:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        means = torch.where(counts[:, None] > 0, l2norm(sums / counts.clamp(min=1)[:, None]), means)
    return means, counts


class NormEMACodebook(nn.Module):
    """K unit-norm codes of dimension d. Lookup is the nearest code by cosine; the codes are not
    learned by gradient but by an exponential moving average of the (normalised) encoder outputs
    assigned to them, re-normalised after every step (official NormEMAVectorQuantizer)."""
    sync = True  # all-reduce k-means and EMA statistics under DDP (a test switches it off)

    def __init__(self, K, d, decay=0.99, beta=1.0, kmeans_iters=10):
        super().__init__()
        self.K, self.decay, self.beta, self.kmeans_iters = K, decay, beta, kmeans_iters
        # official: a frozen nn.Parameter `quantize.embedding.weight`; a buffer says what it is
        self.register_buffer('weight', l2norm(torch.randn(K, d)))
        self.register_buffer('initted', torch.zeros(1))       # 1 once k-means has run
        self.register_buffer('cluster_size', torch.zeros(K))  # EMA of code counts: official layout; unread

    def distances(self, z):  # (M, K) for unit z (M, d), computed as the official code does
        return z.pow(2).sum(1, keepdim=True) + self.weight.pow(2).sum(1) - 2 * z @ self.weight.t()

    def lookup(self, z):
        """z: (B, n, d) task-layer output -> (l2-normalised z, codes (B, n)); no side effects."""
        with torch.autocast(z.device.type, enabled=False):    # codebook maths in fp32 (or fp64)
            z = l2norm(z.to(self.weight.dtype))
            return z, self.distances(z.flatten(0, 1)).argmin(1).view(z.shape[:-1])

    def forward(self, z):
        """-> (quantized z with straight-through gradient, codes, commitment loss).
        In training mode it also initialises (k-means, first call) and updates the codebook."""
        if self.training and not self.initted:
            self.init_codebook(l2norm(z.detach().to(self.weight.dtype)).flatten(0, 1))
        z, codes = self.lookup(z)
        with torch.autocast(z.device.type, enabled=False):
            z_q = self.weight[codes]                          # a copy: the update does not touch it
            if self.training:
                self.ema_update(z.detach().flatten(0, 1), codes.flatten())
            loss = self.beta * F.mse_loss(z_q, z)             # commitment only; codes learn by EMA
            return z + (z_q - z).detach(), codes, loss        # straight-through estimator

    @torch.compiler.disable
    @torch.no_grad()
    def init_codebook(self, z):
        means, _ = kmeans(z, self.K, self.kmeans_iters, sync=self.sync)
        self.weight.copy_(means)
        self.initted.fill_(1)

    @torch.compiler.disable
    @torch.no_grad()
    def ema_update(self, z, codes):                           # z: (M, d) unit vectors, codes: (M,)
        counts = torch.bincount(codes, minlength=self.K).to(z.dtype)    # (K,)
        sums = torch.zeros_like(self.weight).index_add_(0, codes, z)   # (K, d)
        if self.sync and distributed():                       # every rank applies the same update
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        new = l2norm(sums / counts.clamp(min=1)[:, None])     # mean direction of the assigned z
        new = torch.where(counts[:, None] > 0, new, self.weight)  # unused codes keep their value
        self.weight.mul_(self.decay).add_(new, alpha=1 - self.decay)
        self.weight.copy_(l2norm(self.weight))                # back onto the unit sphere


def code_usage(counts):
    """counts: (K,) code histogram -> dict(unused codes, usage fraction, perplexity)."""
    p = counts.double() / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item()
    unused = int((counts == 0).sum())
    return dict(unused=unused, usage=1 - unused / counts.numel(), perplexity=perplexity)


class VQKD(nn.Module):
    """Vector-quantized knowledge distillation (paper Sec. 2.2): encoder -> nearest code ->
    decoder, trained so that the decoder reproduces a teacher's patch features from the codes.
    The teacher is not part of this module: pass its features (B, n, teacher_dim) to forward."""

    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        vit = dict(embed_dim=D, num_heads=cfg.num_heads, layer_scale=0.0, abs_pos_emb=True,
                   rel_pos='none', fc_norm=True)
        self.encoder = ViT(ViTConfig(img_size=cfg.img_size, patch_size=cfg.patch_size,
                                     depth=cfg.depth, **vit))
        self.grid = self.encoder.grid
        # the decoder's "image" is the (d, h, w) code map, embedded by a 1x1 conv
        self.decoder = ViT(ViTConfig(img_size=self.grid[0], patch_size=1, in_chans=cfg.code_dim,
                                     depth=cfg.decoder_depth, **vit))
        self.checked_values = False  # check_images looks at the pixel values of the first batch only
        self.quantize = NormEMACodebook(cfg.codebook_size, cfg.code_dim, cfg.decay, cfg.beta)
        self.encode_task_layer = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, cfg.code_dim))
        self.decode_task_layer = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, cfg.teacher_dim))
        for m in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight.data)
                nn.init.zeros_(m.bias)

    def features(self, images):
        """images in [0, 1] -> (B, n, code_dim), before normalisation."""
        x = self.encoder.forward_patch_tokens(images * 2 - 1)  # official pre_process: [0,1] -> [-1,1]
        with torch.autocast(x.device.type, enabled=False):      # official: task layer in fp32
            return self.encode_task_layer(x.to(self.encode_task_layer[0].weight.dtype))

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, H, W) in [0, 1] -> codes (B, n) int64, row-major patch order. Pure: no
        statistics, no collectives (the official eval forward all-reduces usage counts)."""
        self.check_images(images)
        return self.quantize.lookup(self.features(images))[1]

    def check_images(self, images):
        """What encode expects, as one-line ValueErrors: shape always; the values on the first
        call only (a min/max is a device sync, and a training loop's later batches come the same way)."""
        size = self.cfg.img_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f'encode expects images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}')
        if self.checked_values:
            return
        lo, hi = images.aminmax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError('encode got non-finite pixel values (NaN or inf)')
        if lo < -0.01 or hi > 1.01:
            raise ValueError(f'encode expects RGB values in [0, 1] (as ToTensor gives), got [{lo:.3g}, {hi:.3g}]: '
                             'not ImageNet-normalised, not 0-255')
        self.checked_values = True

    def decode(self, z_q):  # z_q: (B, n, code_dim) -> (B, n, teacher_dim)
        B, n, d = z_q.shape
        code_map = z_q.transpose(1, 2).reshape(B, d, *self.grid)  # (B, d, h, w)
        return self.decode_task_layer(self.decoder.forward_patch_tokens(code_map))

    def forward(self, images, teacher_features=None):
        """-> (reconstruction, codes, losses); losses is None without teacher features.
        loss = mean(1 - cos(reconstruction, teacher)) + commitment."""
        z_q, codes, quant_loss = self.quantize(self.features(images))
        rec = self.decode(z_q)
        if teacher_features is None:
            return rec, codes, None
        t = teacher_features.to(rec.dtype)
        rec_loss = (1 - (l2norm(rec) * l2norm(t)).sum(-1)).mean()
        return rec, codes, dict(loss=rec_loss + quant_loss, rec_loss=rec_loss, quant_loss=quant_loss)

# ----------------------------------------------------------------------------- stage 2: MIM


class MaskingGenerator:
    """Block-wise masking (BEiT, official masking_generator.py): rectangles of at least
    `min_num_patches` patches with aspect ratio in [0.3, 1/0.3] until the count is reached, then
    random patches are (un)masked so that exactly `num_masking_patches` are masked. Defaults are
    the paper's 75 of 196 (14x14) and 16 per block, scaled to other grids."""

    def __init__(self, grid, num_masking_patches=None, min_num_patches=None, max_num_patches=None,
                 min_aspect=0.3):
        self.h, self.w = grid
        n = self.h * self.w
        self.num = round(n * 75 / 196) if num_masking_patches is None else num_masking_patches
        self.min_num = max(2, round(16 * n / 196)) if min_num_patches is None else min_num_patches
        self.max_num = self.num if max_num_patches is None else max_num_patches
        if not 0 <= self.num <= n:
            raise ValueError(f'cannot mask {self.num} of {n} patches')
        if not 0 < min_aspect <= 1:
            raise ValueError(f'min_aspect must be in (0, 1], got {min_aspect}')
        if not 1 <= self.min_num <= self.max_num:
            raise ValueError(f'blocks of {self.min_num} to {self.max_num} patches: need 1 <= min <= max')
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
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, rng=random):
        """-> (h*w,) bool, True = masked (replaced by mask_token and predicted), row-major."""
        mask = torch.zeros(self.h, self.w, dtype=torch.bool)
        count = 0
        while count < self.num:
            delta = self._block(mask, min(self.num - count, self.max_num), rng)
            if delta == 0:
                break
            count += delta
        flat = mask.flatten()
        if count != self.num:  # official: force the exact count with random single patches
            pool = flat.nonzero() if count > self.num else (~flat).nonzero()
            flat[pool[rng.sample(range(len(pool)), abs(count - self.num))]] = count < self.num
        return flat


class BEiTv2(ViT):
    """Masked image modeling with a [CLS] patch-aggregation head (paper Sec. 2.3, Fig. 3).
    Main branch (mim): predict the tokenizer's code of every masked patch from the last layer.
    [CLS] head (cls): the last layer's [CLS] + the patch tokens after block `early_layers` go
    through `head_layers` fresh blocks and the same norm and lm_head, predicting the same codes,
    so the [CLS] token must gather global information. loss = CE(mim) + CE(cls)."""

    def __init__(self, cfg: BEiTConfig):
        if cfg.rel_pos != 'shared':  # the [CLS] head blocks and the speed path read the shared table
            raise ValueError(f"BEiTv2 pretrains with one shared relative position table, got rel_pos={cfg.rel_pos!r}")
        super().__init__(cfg, init=False)  # initialised below, once the heads exist
        D = cfg.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.lm_head = nn.Linear(D, cfg.vocab_size)
        n_dpr = max(cfg.depth, cfg.early_layers + cfg.head_layers)
        dpr = torch.linspace(0, cfg.drop_path, n_dpr).tolist()
        self.cls_pt_layers = nn.ModuleList(  # official name; shares rel_pos_bias, norm and lm_head
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_scale,
                  dpr[cfg.early_layers + i]) for i in range(cfg.head_layers))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Official pretraining init (modeling_pretrain.py): trunc_normal(0.02) cut at +-1 std
        for every Linear and the patch conv weight, cls_token, mask_token; biases 0; LayerNorm
        (1, 0); block l's attn.proj/mlp.fc2 / sqrt(2l). The [CLS] head blocks keep PyTorch's
        default init (the official code builds them after its init pass), rescaled by
        sqrt(2 (early_layers + i + 1))."""
        for name, m in self.named_modules():
            if name.startswith('cls_pt_layers'):
                continue
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, 0.02, cut=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                reset_layer_norm_(m)
        trunc_normal_(self.cls_token, 0.02, cut=0.02)
        trunc_normal_(self.mask_token, 0.02, cut=0.02)
        rescale_blocks_(self.blocks)
        rescale_blocks_(self.cls_pt_layers, self.cfg.early_layers + 1)

    def embed_masked(self, images, mask):
        """(B, N, D): the patch embeddings, the masked ones (mask (B, n) bool, True = masked)
        replaced by the learned mask_token, then [CLS] in front."""
        x = self.patches(images)
        w = mask.unsqueeze(-1).type_as(x)
        return self.with_cls(x * (1 - w) + self.mask_token * w)

    def branches(self, images, mask, rows=None):
        """Each branch's tokens before the final norm: {'mim': (B, N, D), 'cls': (B, N, D)} ('cls'
        only with head layers); with rows (B, R) only those token rows, (B, R, D) (the speed path)."""
        pos_bias = self.shared_pos_bias()                  # (nh, N, N): one table for every block
        E = self.cfg.early_layers
        early = through(self.blocks[:E], self.embed_masked(images, mask), pos_bias)
        x = through(self.blocks[E:], early, pos_bias, rows)                 # the last layer
        out = {'mim': x}
        if self.cls_pt_layers:
            h = torch.cat([x[:, :1], early[:, 1:]], dim=1)  # last-layer [CLS] + early patch tokens
            out['cls'] = through(self.cls_pt_layers, h, pos_bias, rows)
        return out

    def forward(self, images, mask, targets=None):
        """images (B, 3, H, W) ImageNet-normalised (the tokenizer's encode takes [0, 1]); mask (B, n)
        bool, True = masked; targets (B, n) the tokenizer's codes.
        -> (logits, losses): logits {'mim', 'cls'}, each (M, vocab) for the M masked patches in
        row-major order; losses {'loss_mim', 'loss_cls', 'loss' (their sum)}, None without targets.
        The official logs call them loss_1 / loss_2 (mlm_acc_1 / mlm_acc_2)."""
        rows = rows_read_by_heads(mask)                    # speed path (next section); None: every row
        tokens = self.branches(images, mask, rows)         # {'mim': last layer, 'cls': [CLS] head}
        logits = {}
        for name, x in tokens.items():                     # the final norm and the shared LM head
            logits[name] = self.lm_head(self.norm(masked_patches(x, mask, rows)))
        return logits, (None if targets is None else self.forward_loss(logits, targets[mask]))

    def forward_loss(self, logits, labels):  # labels (M,): the tokenizer's codes of the masked patches
        losses = {f'loss_{k}': F.cross_entropy(lg, labels) for k, lg in logits.items()}
        losses['loss'] = sum(losses.values())
        return losses

# ----------------------------------------------------------------------------- stage 2: speed path
# BEiTv2.forward's one trick: the last block of each branch computes only the rows the heads read,
# [CLS] and the masked patches. The same numbers (test_pretrain_fast_path_equals_full_computation);
# a ViT-Tiny training step 3.7% faster in fp32 (459 vs 476 ms, batch 8, 2-core CPU without bf16
# units) and 4.6% in bf16, measured in one process. On a GPU its mask-count check is a host sync
# per step (as the official x[mask] is); its gain there was not measured on its own.


def rows_read_by_heads(mask):
    """(B, 1 + R) token rows, [CLS] then the masked patches in row-major order, when every image
    has the same masked count R, as the masking generator gives; else None (the plain path)."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        return None
    patch_rows = mask.nonzero()[:, 1].view(len(mask), -1) + 1          # (B, R); +1: after [CLS]
    return F.pad(patch_rows, (1, 0))                                    # row 0, [CLS], in front


def gather_rows(x, rows):  # x (B, N, D), rows (B, R) -> the rows of each sample, (B, R, D)
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def block_rows(blk, x, pos_bias, rows):
    """= gather_rows(blk(x, pos_bias), rows), computing queries, projection and MLP for those rows
    only (keys and values still come from every row)."""
    B, N, C = x.shape
    q, k, v = blk.attn.heads(blk.norm1(x))                             # each (B, nh, N, hs)
    q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # (B, nh, R, hs)
    if pos_bias is not None:
        pos_bias = pos_bias[:, rows].transpose(0, 1)                   # (B, nh, R, N)
    a = blk.attn.proj(attention(q, k, v, pos_bias).transpose(1, 2).reshape(B, rows.shape[1], C))
    x = gather_rows(x, rows) + drop_path(blk.scaled(blk.gamma_1, a), blk.drop_path, blk.training)
    m = blk.scaled(blk.gamma_2, blk.mlp(blk.norm2(x)))
    return x + drop_path(m, blk.drop_path, blk.training)


def through(blocks, x, pos_bias, rows=None):
    """x (B, N, D) through `blocks`: the plain loop; with rows (B, R) only those rows come out,
    (B, R, D), and the last block computes only them."""
    if rows is None:
        for blk in blocks:
            x = blk(x, pos_bias)
        return x
    if not blocks:
        return gather_rows(x, rows)
    for blk in blocks[:-1]:
        x = blk(x, pos_bias)
    return block_rows(blocks[-1], x, pos_bias, rows)


def masked_patches(x, mask, rows):  # a branch's tokens -> (M, D): the masked patches, row-major
    return x[:, 1:][mask] if rows is None else x[:, 1:].flatten(0, 1)

# ----------------------------------------------------------------------------- optimizer


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

# ----------------------------------------------------------------------------- checkpoints


def load_file(path):
    """Read a checkpoint without executing code: torch.load(weights_only=True), with
    argparse.Namespace allowed because the official files carry their `args`. A missing,
    truncated or foreign file, or one that would run code, raises ValueError with one line."""
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r'GLOBAL (\S+)', str(e))  # a pickled object that would call this function
        if code:
            raise ValueError(f'{path}: refused to load: it would run code ({code.group(1)}); a checkpoint '
                             'holds only tensors and plain containers') from None
        raise ValueError(f'{path}: not a readable checkpoint (truncated, or not a PyTorch file)') from None
    except (RuntimeError, OSError, EOFError, KeyError, IndexError, ValueError):  # what torch raises on junk
        raise ValueError(f'{path}: not a readable checkpoint (truncated, or not a PyTorch file)') from None


def state_dict_of(ckpt):
    """The weights inside a checkpoint: 'model' (ours, official tokenizer and pretraining files),
    'module' (official fine-tuned files, DeepSpeed), 'state_dict', or the dict itself."""
    for key in ('model', 'module', 'state_dict'):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt
    raise ValueError("no state dict found (expected a 'model', 'module' or 'state_dict' entry)")


PRETRAIN_ONLY = ('mask_token', 'lm_head', 'norm', 'cls_pt_layers')  # dropped when fine-tuning


def _spline_matrix(x, xq):
    """(len(xq), len(x)) matrix of the not-a-knot cubic spline through points x evaluated at xq.
    scipy's interp2d(kind='cubic'), used by the official loader, is the tensor product of these."""
    x, xq = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(xq, dtype=torch.float64)
    n, h = len(x), x.diff()
    A, R = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    A[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])           # 3rd derivative continuous
    A[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])     # at x[1] and x[-2]
    for i in range(1, n - 1):  # second derivatives M: h0 M0 + 2(h0+h1) M1 + h1 M2 = 6 (dy1/h1 - dy0/h0)
        A[i, i - 1:i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        R[i, i - 1:i + 2] = 6 * torch.stack([1 / h[i - 1], -1 / h[i - 1] - 1 / h[i], 1 / h[i]])
    M = torch.linalg.solve(A, R)                                   # (n, n): y -> second derivatives
    i = (torch.searchsorted(x, xq) - 1).clamp(0, n - 2)
    a, b, hi = x[i + 1] - xq, xq - x[i], h[i]
    eye = torch.eye(n, dtype=torch.float64)
    ca, cb = (a ** 3 / (6 * hi) - a * hi / 6)[:, None], (b ** 3 / (6 * hi) - b * hi / 6)[:, None]
    return M[i] * ca + M[i + 1] * cb + eye[i] * (a / hi)[:, None] + eye[i + 1] * (b / hi)[:, None]


def resize_rel_pos_table(table, dst_rows):
    """Official fine-tuning resize of a relative position table to another grid: source offsets
    placed on a geometric progression, bicubic spline to integer offsets; last 3 rows kept."""
    src, dst = int(math.sqrt(table.shape[0] - 3)), int(math.sqrt(dst_rows - 3))
    lo, hi = 1.01, 1.5  # bisection for q with sum_{k < src/2} q^k = dst/2 (official)
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** (src // 2)) / (1 - q) > dst // 2 else (q, hi)
    dis = [sum(q ** k for k in range(i + 1)) for i in range(src // 2)]
    x = [-d for d in reversed(dis)] + [0] + dis
    t = dst // 2.0
    S = _spline_matrix(x, torch.arange(-t, t + 0.1, 1.0))        # (dst, src)
    grid = table[:-3].double().T.reshape(-1, src, src)           # (nh, src, src)
    out = (S @ grid @ S.T).reshape(-1, dst * dst).T.to(table.dtype)
    return torch.cat([out, table[-3:]])


def _convert(own, sd):
    """Official/timm layouts -> ours, given our state dict `own` (a new dict; nothing is loaded)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(('teacher', 'scaling', 'loss'))}
    rename = {'quantize.embedding.weight': 'quantize.weight', 'quantize.embedding.initted': 'quantize.initted'}
    sd = {rename.get(k, k): v for k, v in sd.items()
          if k not in ('quantize.embedding.cluster_size', 'quantize.embedding.embed_avg')}  # never read
    shared = sd.pop('rel_pos_bias.relative_position_bias_table', None)
    if shared is not None and 'rel_pos_bias.relative_position_bias_table' in own:
        sd['rel_pos_bias.relative_position_bias_table'] = shared
    elif shared is not None:  # pretraining -> fine-tuning: every block starts from the shared table
        for k in own:
            if k.endswith('attn.relative_position_bias_table'):
                sd[k] = shared.clone()
    for k, v in list(sd.items()):
        if k.endswith('relative_position_bias_table') and k in own and v.shape != own[k].shape:
            sd[k] = resize_rel_pos_table(v, own[k].shape[0])
            sd.pop(k.replace('bias_table', 'index'), None)  # the file's index is of its own grid
        if k.endswith('pos_embed') and k in own and v.shape != own[k].shape:  # bicubic, as official
            s, d = int(math.sqrt(v.shape[1] - 1)), int(math.sqrt(own[k].shape[1] - 1))
            g = v[:, 1:].reshape(1, s, s, -1).permute(0, 3, 1, 2).float()
            g = F.interpolate(g, size=(d, d), mode='bicubic', align_corners=False)
            sd[k] = torch.cat([v[:, :1], g.permute(0, 2, 3, 1).flatten(1, 2).to(v.dtype)], dim=1)
    return sd


def load_state(model, sd, ignore=()):
    """Strictly load a state dict in our, the official or timm's layout into `model`.
    `ignore`: key prefixes that may be absent from the model (dropped) or from sd (left at
    init), e.g. PRETRAIN_ONLY + ('fc_norm', 'head') to fine-tune from a pretraining file.
    relative_position_index buffers are derived: absent ones are fine, present ones must match."""
    own = model.state_dict()
    sd = _convert(own, sd)
    buffers = dict(model.named_buffers())
    for k in [k for k in sd if k.endswith('relative_position_index')]:
        v = sd.pop(k)
        if k in buffers and not torch.equal(v.to(buffers[k]), buffers[k]):
            raise ValueError(f'{k}: relative_position_index differs from the one of this grid')

    def ignored(k):
        return any(k == p or k.startswith(p + '.') for p in ignore)
    missing = [k for k in own if k not in sd and not ignored(k)]
    unexpected = [k for k in sd if k not in own and not ignored(k)]
    wrong = [f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}' for k in sd
             if k in own and sd[k].shape != own[k].shape and not ignored(k)]
    if missing or unexpected or wrong:
        raise KeyError(f'state dict does not fit {type(model).__name__}: missing {missing[:8]}, '
                       f'unexpected {unexpected[:8]}, wrong shape {wrong[:8]}')
    model.load_state_dict({k: v for k, v in sd.items() if k in own and sd[k].shape == own[k].shape},
                          strict=False)
    return model


def export_state(model, layout='official'):
    """Our model's weights in the official layout (what the official code loads, with the
    relative_position_index buffers it saves) or timm's (classifiers only; no index buffers)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == 'timm':
        if not isinstance(model, ViT) or model.cfg.rel_pos != 'per_block':
            raise ValueError('timm layout: only fine-tuning classifiers (per-block relative bias)')
        return sd
    for k, v in model.named_buffers():
        if k.endswith('relative_position_index'):
            sd[k] = v.clone()
    if isinstance(model, VQKD):
        q = model.quantize
        sd['quantize.embedding.weight'] = sd.pop('quantize.weight')
        sd['quantize.embedding.initted'] = sd.pop('quantize.initted')
        sd['quantize.embedding.cluster_size'] = torch.zeros_like(q.cluster_size)  # unused officially
        sd['quantize.embedding.embed_avg'] = q.weight.clone()                     # unused officially
    return sd


def vqkd_config_from_state(sd):
    """VQKDConfig of an official tokenizer state dict, read off its shapes (64-dim heads assumed)."""
    w = sd['encoder.patch_embed.proj.weight']
    D, p = w.shape[0], w.shape[-1]

    def count(prefix):  # blocks under prefix
        return len({k.split('.')[2] for k in sd if k.startswith(prefix + '.blocks.')})
    grid = int(math.sqrt(sd['encoder.pos_embed'].shape[1] - 1))
    K, d = sd['quantize.embedding.weight'].shape
    return VQKDConfig(img_size=grid * p, patch_size=p, embed_dim=D, depth=count('encoder'),
                      num_heads=D // 64, decoder_depth=count('decoder'), codebook_size=K, code_dim=d,
                      teacher_dim=sd['decode_task_layer.2.weight'].shape[0])


def load_tokenizer(path):
    """A frozen VQKD in eval mode from our checkpoint (which stores its config) or an official
    file (config read off the shapes); e.g. vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth."""
    ckpt = load_file(path)
    sd = state_dict_of(ckpt)
    if not any(k in sd for k in ('quantize.weight', 'quantize.embedding.weight')):
        what = 'a backbone (pretraining or fine-tuning) checkpoint' if 'patch_embed.proj.weight' in sd else 'not one'
        raise ValueError(f'{path}: not a tokenizer checkpoint (no codebook in it): {what}')
    if isinstance(ckpt.get('model_config'), dict):
        cfg = VQKDConfig(**current_names(ckpt['model_config']))
    else:
        cfg = vqkd_config_from_state(sd)
    model = load_state(VQKD(cfg), sd).eval()
    return model.requires_grad_(False)
