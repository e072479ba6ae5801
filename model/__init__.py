"""PDD (Manifold-Prior Diverse Distillation) in pure PyTorch.

Importable with only torch, timm, numpy and safetensors installed: no Ray, pydicom, CUDA or
mamba-ssm needed (the CUDA scan kernel is probed lazily in ``model.scan``).
"""
