"""Loaded by the SGLang engine venv at interpreter start (copied into its site-packages by build_engine_venv.sh).

If a CUDA build of torchvision is importable next to the CPU torch, its operator registrations fail
(``operator torchvision::nms does not exist``) and any module that imports torchvision dies. Declaring the
two operator schemas that its meta registrations refer to lets ``import torchvision`` finish; the operators
stay unimplemented, which text-only models never notice. Set ``MEGATRON_DAPO_TV_SCHEMA=0`` to disable.
"""
import importlib.util
import os

if os.environ.get("MEGATRON_DAPO_TV_SCHEMA", "1") == "1" and importlib.util.find_spec("torchvision") is not None:
    try:
        import torch

        _megatron_dapo_tv = torch.library.Library("torchvision", "DEF")
        for _schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
            _megatron_dapo_tv.define(_schema)
    except Exception:  # an already-registered schema (working torchvision) is fine
        pass
