"""``cli.py predict`` and ``predict-slide``: new tiles and whole slides."""
from __future__ import annotations

from pathlib import Path

from core.errors import HexpressError
from commands.common import DEFAULT_CACHE, common_data, predict_args


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("predict", help="predict a test table with a run or stack and write the CSV",
                        description="Embed the test tiles if needed (same backbone settings, checked), predict, "
                                    "apply the stack, and write ID + genes (training order or --template order).")
    sp.add_argument("run", metavar="RUN", help="run or stack folder")
    common_data(sp, repeatable=True,
                data_help="test tile table (CSV or Parquet): ID, path, [slide/patient], [x, y]; repeat it with the "
                          "same spots cut at each tile size when the stack's runs were trained on several (`tiles "
                          "--tile-um`: each run gets the table of its own size; rows follow the first)")
    sp.add_argument("--into-source", action="store_true", help="with --out *.zarr, for a table imported by `tiles "
                    "spatialdata`: write a copy of the source store with the predictions as a table annotating its "
                    "own spots, bins or cells")
    sp.add_argument("--out", required=True, help="FILE to write: a submission CSV (*.csv), a SpatialData store (*.zarr: "
                    "the H&E, the tiles as shapes and the predictions as a table) or AnnData (*.h5ad, with x, y as "
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
    sp.add_argument("--out", required=True, help="FILE to write: AnnData (*.h5ad) or a SpatialData store (*.zarr)")
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


def cmd_predict(args) -> int:
    from regress.runs.predict import predict_table, write_submission

    kind = Path(args.out).suffix.lower()
    if kind not in (".csv", ".h5ad", ".zarr"):
        raise HexpressError(f"--out {args.out}: predict writes a submission CSV (*.csv), AnnData (*.h5ad) or a "
                            "SpatialData store (*.zarr).")
    if kind != ".csv" and args.template:
        raise HexpressError(f"--template orders a submission CSV; it does not apply to --out *{kind}.")
    if args.into_source and kind != ".zarr":
        raise HexpressError("--into-source adds the predictions to a copy of the source store; name --out *.zarr.")
    if kind == ".zarr":
        from featurize.importers.spatialdata import require_spatialdata

        require_spatialdata()  # before any tile is embedded
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
    if kind == ".zarr":
        print(_write_zarr(args, test, df, genes, res, prov))
        return 0
    print(write_h5ad(args.out, df["ID"].tolist(), genes, df[genes].to_numpy(), xy=test.xy,
                     symbols=res.info.get("gene_names"), slide=slides, provenance=prov))
    return 0

def _write_zarr(args, test, df, genes, res, prov):
    import numpy as np

    from featurize.tables.table import read_sidecar
    from regress.outputs import sdata

    side = read_sidecar(test.source)
    symbols = res.info.get("gene_names")
    if args.into_source:
        if not side or side.get("format") != "spatialdata" or side.get("rows") == "pseudo-spots":
            raise HexpressError(f"--into-source: {test.source} was not imported from a SpatialData store row by row "
                                "(`tiles spatialdata` without --pseudo-spot); drop --into-source.")
        if len(side["slides"]) != 1:
            raise HexpressError(f"--into-source: {test.source} holds several stores; predict one store's table at a time.")
        slide, rep = next(iter(side["slides"].items()))
        keys = [str(i)[len(slide) + 1:] for i in df["ID"]]
        return sdata.add_to_store(rep["store"], args.out, df["ID"].tolist(), keys, genes, df[genes].to_numpy(),
                                  table=rep["table"], shapes=rep["shapes"], symbols=symbols, provenance=prov)
    sides, images = sdata.table_geometry(test, side, Path(args.out))
    slides = test.slides if test.slides is not None else np.full(len(test.ids), test.name)
    return sdata.write_spatialdata(args.out, df["ID"].tolist(), genes, df[genes].to_numpy(), xy=test.xy,
                                   slides=slides, tile_px=sides, images=images, symbols=symbols, provenance=prov)


def cmd_predict_slide(args) -> int:
    from regress.outputs.slides import predict_slide

    print(predict_slide(args.run, args.slide, args.out, mpp=args.mpp, tile_um=args.tile_um, force=args.force,
                        work_dir=args.work_dir, cache_dir=args.cache_dir, device=args.device,
                        batch_size=args.batch_size, min_tissue=args.min_tissue, genes=args.gene or (),
                        trust_pickle=args.trust_pickle, progress=not args.quiet))
    return 0
