"""Audit a foundation-model backbone as an encoder: the recipe for your own pretrained checkpoint.

    python examples/encoder_example.py --checkpoint /path/to/dinov2-small   # a local Hugging Face folder
    python examples/encoder_example.py                                      # offline demo: a small random DINOv2

With ``--checkpoint`` the backbone is read from a local Hugging Face folder (``config.json`` and
weights, e.g. a ``facebook/dinov2-small`` snapshot you downloaded beforehand; nothing is fetched
here). Without it a small randomly initialised DINOv2 stands in, so the whole path runs offline;
its probes then measure what random features can do, nothing more.

The backbone is traced to TorchScript (``strict=False`` keeps Hugging Face's dict output, whose
``pooler_output`` is the CLS embedding after the final norm), the bundled MNI152 patches are split
into a reference set (the probes are fitted on it) and an audit set, and ``medaudit run`` audits
the encoder with ``task.type: embedding`` (docs/encoders.md). For a timm model, build it in the
same way (``timm.create_model(...)``, ``load_state_dict``), trace it, and drop ``output_key``: its
``forward_features`` + pooling returns a tensor.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

CONFIG = """\
model:
  name: "{name}"
  intended_use: "Demonstrates an encoder audit. Not a medical device."
  output_key: pooler_output   # the traced model returns Hugging Face's outputs as a dict
input:
  preset: dinov2              # 3 channels, ImageNet mean/std; grey patches are replicated after perturbation
  spatial_size: [{size}, {size}]
  modality: mri
  intensity: {{scaling: fixed, max_value: 255}}
task:
  type: embedding
  classes: [csf_other, grey_matter, white_matter]
  probe_c: 1.0
  probe_k: 20
audit:
  seed: 0
  bootstrap: 200
  severities: [1, 3, 5]
checks:
  - "*.representation.cka<0.5"
output:
  dir: {out}
"""


def backbone(checkpoint: Path | None) -> tuple[torch.nn.Module, int, str]:
    """The encoder, the input size it takes, and a name for the report."""
    from transformers import Dinov2Config, Dinov2Model

    if checkpoint is not None:
        model = Dinov2Model.from_pretrained(checkpoint, local_files_only=True)
        return model.eval(), 224, f"DINOv2 from {checkpoint}"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                          image_size=48, patch_size=8)
    return Dinov2Model(config).eval(), 48, "small random DINOv2 (demo)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a local Hugging Face model folder (config.json + weights)")
    parser.add_argument("--work", type=Path, default=Path("medaudit-out/encoder-example"), help="where files go")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    model, size, name = backbone(args.checkpoint)
    traced = torch.jit.trace(model, torch.zeros(2, 3, size, size), strict=False)
    model_path = args.work / "encoder.pt"
    torch.jit.save(traced, str(model_path))

    data = np.load(HERE / "mni-patches" / "test.npz")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data["labels"]))
    ref, test = order[:300], order[300:]
    np.savez(args.work / "reference.npz", images=data["images"][ref], labels=data["labels"][ref])
    np.savez(args.work / "audit.npz", images=data["images"][test], labels=data["labels"][test],
             meta_level=data["meta_level"][test])
    config = args.work / "encoder.yaml"
    config.write_text(CONFIG.format(name=name, size=size, out=args.work / "audit"), encoding="utf-8")

    command = [sys.executable, "-c", "from medaudit.cli import main; main()", "run", str(model_path), "--data", str(args.work / "audit.npz"),
               "--reference", str(args.work / "reference.npz"), "--config", str(config)]
    print("$", " ".join(command))
    return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
