"""UperNet on a ViT, the official BEiT segmentation model (semantic_segmentation/, mmseg 0.x): the
features of four blocks made into four scales, a pyramid-pooling + FPN decoder, an auxiliary FCN head."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class Segmenter(nn.Module):
    """Official BEiT segmentation: block features -> 4 scales (strides 4, 8, 16, 32) -> UperNet
    (pyramid pooling 1/2/3/6 + FPN fusion) and an auxiliary FCN head on the stride-16 scale."""

    def __init__(self, backbone, layers, num_classes, channels=None):
        super().__init__()
        D = backbone.cfg.embed_dim
        c = channels or D
        self.backbone, self.layers = backbone, tuple(layers)
        # no final norm, no blocks past the last one read: every parameter gets a gradient (DDP)
        backbone.norm = backbone.fc_norm = None
        del backbone.blocks[max(layers) + 1:]
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(),
                                  nn.ConvTranspose2d(D, D, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(D, D, 2, 2)
        self.fpn4 = nn.MaxPool2d(2)
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(D, c, 1)) for s in (1, 2, 3, 6))
        self.bottleneck = conv_bn_relu(D + 4 * c, c, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(D, c, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(c, c, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * c, c, 3)
        self.cls = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(c, num_classes, 1))
        self.aux = nn.Sequential(conv_bn_relu(D, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))
        for name, m in self.named_modules():  # mmseg's init of the heads; the backbone keeps its weights
            if isinstance(m, nn.Conv2d) and not name.startswith('backbone'):
                if m.out_channels == num_classes:  # conv_seg: N(0, 0.01)
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)
                else:                              # ConvModule: kaiming normal, fan_out, relu
                    nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, images):  # -> (logits, aux logits), each (B, classes, H, W)
        _, xs = self.backbone.forward_tokens(images, layers=self.layers)
        h, w = self.backbone.grid
        f = [x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w) for x in xs]   # (B, D, h, w)
        f = [self.fpn1(f[0]), self.fpn2(f[1]), f[2], self.fpn4(f[3])]              # strides 4..32
        top = f[3]
        lat = [conv(x) for conv, x in zip(self.lateral, f[:3])]
        lat.append(self.bottleneck(torch.cat([top] + [F.interpolate(p(top), top.shape[2:], mode='bilinear')
                                                      for p in self.ppm], 1)))
        for i in range(3, 0, -1):                                                  # top-down path
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], lat[i - 1].shape[2:], mode='bilinear')
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:3])] + [lat[3]]
        outs = [F.interpolate(o, outs[0].shape[2:], mode='bilinear') for o in outs]
        logits, aux = self.cls(self.fuse(torch.cat(outs, 1))), self.aux(f[2])
        size = images.shape[2:]
        return F.interpolate(logits, size, mode='bilinear'), F.interpolate(aux, size, mode='bilinear')
