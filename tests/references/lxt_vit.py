"""Reference input relevance of torchvision's ViT-B/16 from LXT (CP-LRP), in a process of its own.

LXT patches torch.nn.LayerNorm, GELU and MultiheadAttention for the whole process with no way back,
so it never runs inside the test process. Usage: python lxt_vit.py STATE.pt INPUT.pt TARGETS.pt OUT.pt
"""

import sys

import torch
from lxt.efficient import monkey_patch
from lxt.efficient.models.vit_torch import cp_LRP
from torchvision.models import vision_transformer

state_path, input_path, target_path, out_path = sys.argv[1:5]
monkey_patch(vision_transformer, cp_LRP)
model = vision_transformer.vit_b_16(image_size=64)
model.load_state_dict(torch.load(state_path))
model = model.double().eval()
x = torch.load(input_path).requires_grad_(True)
targets = torch.load(target_path)
logits = model(x)
logits[torch.arange(len(targets)), targets].sum().backward()
torch.save({"relevance": (x * x.grad).detach(), "logits": logits.detach()}, out_path)
