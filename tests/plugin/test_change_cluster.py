"""``explora_geo:change``, ``explora_geo:cluster`` and the DEVICE / THREADS choice, end to end in headless
QGIS 3.22 with models exported by ``explora-geo export`` during the test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from osgeo import gdal, ogr, osr
from test_algorithms import Feedback, _layer, _read, _run

TILE = 32  # the session bundle's tile size, px (10 m pixels)
BLOCK = (slice(8, 12), slice(20, 24))  # tile rows / cols of the changed block


@pytest.fixture(scope="module")
def after_4326(t33uuu_vrt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The T33UUU scene as float32 in EPSG:4326 (another CRS than BEFORE's UTM): a 4 x 4-tile block replaced
    by pixels from elsewhere in the scene (the change), and the first 64 rows NaN (nodata after)."""
    folder = tmp_path_factory.mktemp("after")
    src = gdal.Open(str(t33uuu_vrt))
    utm = gdal.Translate(str(folder / "after_utm.tif"), src, outputType=gdal.GDT_Float32)
    rows, cols = (BLOCK[0].start * TILE, BLOCK[0].stop * TILE), (BLOCK[1].start * TILE, BLOCK[1].stop * TILE)
    for i in range(1, utm.RasterCount + 1):
        band = utm.GetRasterBand(i)
        values = band.ReadAsArray()
        values[rows[0]:rows[1], cols[0]:cols[1]] = values[600:600 + rows[1] - rows[0], 100:100 + cols[1] - cols[0]]
        values[:64] = np.nan
        band.WriteArray(values)
        band.SetDescription(src.GetRasterBand(i).GetDescription())
    utm = src = None
    path = folder / "after_4326.tif"
    warped = gdal.Warp(str(path), str(folder / "after_utm.tif"), dstSRS="EPSG:4326", resampleAlg="bilinear",
                       srcNodata=np.nan, dstNodata=np.nan)
    src = gdal.Open(str(t33uuu_vrt))
    for i in range(1, warped.RasterCount + 1):  # gdal.Warp does not carry band descriptions
        warped.GetRasterBand(i).SetDescription(src.GetRasterBand(i).GetDescription())
    warped = src = None
    return path


def test_change_ranks_the_changed_block_highest(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, after_4326: Path,
                                                tmp_path: Path) -> None:
    feedback = Feedback.make()
    out = _run("change", {"BEFORE": _layer(t33uuu_vrt, "2020"), "AFTER": _layer(after_4326, "2023"),
                          "MODEL": str(bundle["embedder"]), "BATCH_SIZE": 64, "OUTPUT": str(tmp_path / "change.tif"),
                          "OUTPUT_GRID": str(tmp_path / "change.gpkg")}, feedback)
    ds = gdal.Open(out["OUTPUT"])
    assert ds.GetGeoTransform() == (330000.0, 320.0, 0.0, 5822040.0, 0.0, -320.0)  # BEFORE's grid, UTM 33N
    assert ds.GetSpatialRef().GetAuthorityCode(None) == "32633"
    assert ds.GetRasterBand(1).DataType == gdal.GDT_Float32 and ds.GetRasterBand(1).GetNoDataValue() == -9999
    ds = None
    score = _read(out["OUTPUT"])
    assert score.shape == (24, 48)
    # nodata AFTER (the NaN rows, 64 px = the first 2 tile rows) -> nodata
    assert (score[:2] == -9999).all() and (score[2:] != -9999).all()
    block = np.zeros(score.shape, bool)
    block[BLOCK] = True
    valid = score != -9999
    ranked = np.argsort(np.where(valid, score, -np.inf), axis=None)[::-1]
    assert set(ranked[:block.sum()]) == set(np.flatnonzero(block)), (score[block], np.sort(score[~block])[-5:])
    assert score[block].min() > score[valid & ~block].max()
    assert any("tiles/s" in m for m in feedback.infos) and any("highest at" in m for m in feedback.infos)
    # the optional grid: the score and both valid fractions per tile
    source = ogr.Open(out["OUTPUT_GRID"])
    rows = [dict(f.items()) for f in source.GetLayer(0)]
    source = None
    assert len(rows) == 24 * 48
    by_cell = {(r["tile_row"], r["tile_col"]): r for r in rows}
    assert by_cell[(0, 0)]["status"] == "nodata" and by_cell[(0, 0)]["change"] is None
    assert by_cell[(9, 21)]["change"] == pytest.approx(float(score[9, 21]), rel=1e-6)
    assert by_cell[(9, 21)]["valid_frac_before"] == 1.0 and by_cell[(9, 21)]["status"] in ("ok", "partial")


def test_change_of_rasters_that_do_not_overlap_is_one_line(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                           tmp_path: Path) -> None:
    from qgis.core import QgsProcessingException

    far = tmp_path / "far.tif"
    ds = gdal.Translate(str(far), str(t33uuu_vrt), srcWin=[0, 0, 256, 256])
    gt = list(ds.GetGeoTransform())
    gt[0] += 500_000.0  # 500 km east: same CRS, no overlap
    ds.SetGeoTransform(gt)
    ds = None
    with pytest.raises(QgsProcessingException) as err:
        _run("change", {"BEFORE": _layer(t33uuu_vrt), "AFTER": _layer(far, "far"), "MODEL": str(bundle["embedder"]),
                        "OUTPUT": str(tmp_path / "c.tif")})
    message = str(err.value)
    assert "do not overlap" in message and "'far'" in message and "\n" not in message
    assert not (tmp_path / "c.tif").exists()


def _spectra_raster(path: Path, bands: tuple[str, ...], pattern: np.ndarray) -> Path:
    """A uint16 raster (nodata 0) of ``pattern`` ``[R, K]`` tiles: kind k >= 0 is one constant spectrum per
    tile plus 1 % noise, -1 is nodata."""
    spectra = np.array([[900, 700, 500, 300, 450, 400, 350, 320, 150, 100],  # water-like
                        [400, 700, 450, 3800, 1200, 3000, 3500, 3900, 2000, 1000],  # vegetation-like
                        [2600, 2800, 3000, 3300, 3100, 3200, 3250, 3350, 3800, 3500]],  # bright soil-like
                       dtype=np.float64)
    rng = np.random.default_rng(0)
    r, k = pattern.shape
    data = np.zeros((len(bands), r * TILE, k * TILE), np.uint16)
    for (i, j), kind in np.ndenumerate(pattern):
        if kind >= 0:
            tile = spectra[kind][:, None, None] * (1 + 0.01 * rng.normal(size=(len(bands), TILE, TILE)))
            data[:, i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE] = tile.astype(np.uint16)
    ds = gdal.GetDriverByName("GTiff").Create(str(path), k * TILE, r * TILE, len(bands), gdal.GDT_UInt16)
    ds.SetGeoTransform((400000.0, 10.0, 0.0, 5800000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    for b, name in enumerate(bands, start=1):
        ds.GetRasterBand(b).WriteArray(data[b - 1])
        ds.GetRasterBand(b).SetDescription(name)
        ds.GetRasterBand(b).SetNoDataValue(0)
    ds = None
    return path


def test_cluster_recovers_known_well_separated_tiles(qgis_app: Any, bundle: dict, tmp_path: Path) -> None:
    from explora_geo_qgis.core.model import OnnxModel

    bands = OnnxModel(bundle["embedder"]).info.bands
    rng = np.random.default_rng(1)
    pattern = rng.choice(3, size=(6, 8), p=[0.55, 0.3, 0.15])
    pattern[0, :2] = -1  # nodata tiles
    path = _spectra_raster(tmp_path / "kinds.tif", bands, pattern)
    feedback = Feedback.make()
    out = _run("cluster", {"INPUT": _layer(path, "kinds"), "MODEL": str(bundle["embedder"]), "CLUSTERS": 3,
                           "SEED": 5, "OUTPUT": str(tmp_path / "clusters.tif")}, feedback)
    ds = gdal.Open(out["OUTPUT"])
    # (GDAL 3.6 GTiff: the first PAM read, e.g. of category names, returns nothing until georeferencing loaded)
    assert ds.GetGeoTransform() == (400000.0, 320.0, 0.0, 5800000.0, 0.0, -320.0)
    band = ds.GetRasterBand(1)
    assert band.GetCategoryNames() == ["cluster 1", "cluster 2", "cluster 3"]
    assert band.GetColorTable() is not None and band.GetNoDataValue() == 255
    labels = band.ReadAsArray()
    ds = None
    assert (labels[pattern < 0] == 255).all()
    known, found = pattern[pattern >= 0], labels[pattern >= 0]
    assert len(set(zip(known.tolist(), found.tolist()))) == 3  # the same partition as the known kinds
    sizes = np.bincount(found, minlength=3)
    assert list(sizes) == sorted(sizes, reverse=True)  # cluster 1 is the largest
    assert out["TILES_RUN"] == int((pattern >= 0).sum())
    assert any("k-means, k=3, seed 5" in m for m in feedback.infos)
    # the same seed gives the same map
    again = _run("cluster", {"INPUT": _layer(path, "kinds"), "MODEL": str(bundle["embedder"]), "CLUSTERS": 3,
                             "SEED": 5, "OUTPUT": str(tmp_path / "again.tif")})
    assert np.array_equal(_read(again["OUTPUT"]), labels)


def test_cluster_more_clusters_than_distinct_tiles_is_one_line(qgis_app: Any, bundle: dict, tmp_path: Path) -> None:
    from explora_geo_qgis.core.model import OnnxModel
    from qgis.core import QgsProcessingException

    bands = OnnxModel(bundle["embedder"]).info.bands
    path = _spectra_raster(tmp_path / "two.tif", bands, np.array([[0, 1], [1, 0]]))
    with pytest.raises(QgsProcessingException, match="cannot make 5 clusters") as err:
        _run("cluster", {"INPUT": _layer(path), "MODEL": str(bundle["embedder"]), "CLUSTERS": 5,
                         "OUTPUT": str(tmp_path / "c.tif")})
    assert "\n" not in str(err.value)


def test_device_and_threads_reported_with_tiles_per_second(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                           tmp_path: Path) -> None:
    feedback = Feedback.make()
    out = _run("embed", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]), "DEVICE": 1, "THREADS": 1,
                         "EXTENT": "330000,333200,5818840,5822040 [EPSG:32633]", "OUTPUT": str(tmp_path / "e.tif")},
                   feedback)
    assert out["EXECUTION_PROVIDER"] == "CPUExecutionProvider"
    line = next(m for m in feedback.infos if "tiles/s" in m)
    assert "on CPU (CPUExecutionProvider, 1 thread)" in line


def test_unavailable_cuda_refuses_or_falls_back_with_one_line(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                              tmp_path: Path) -> None:
    import onnxruntime
    from qgis.core import QgsProcessingException

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA; the test needs one without it (the plugin suite's own)")
    params = {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]),
              "EXTENT": "330000,333200,5818840,5822040 [EPSG:32633]", "OUTPUT": str(tmp_path / "e.tif")}
    with pytest.raises(QgsProcessingException, match="CUDA was chosen but this onnxruntime offers only") as err:
        _run("embed", {**params, "DEVICE": 2})
    assert "\n" not in str(err.value) and not (tmp_path / "e.tif").exists()
    feedback = Feedback.make()  # automatic: the CPU
    assert _run("embed", {**params, "DEVICE": 0}, feedback)["EXECUTION_PROVIDER"] == "CPUExecutionProvider"
    assert any("tiles/s on CPU (CPUExecutionProvider, default threads)" in m for m in feedback.infos)


def test_change_and_cluster_outputs_load_named_and_styled(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                          after_4326: Path, tmp_path: Path) -> None:
    import processing
    from qgis.core import QgsProcessingContext, QgsProject

    project = QgsProject.instance()
    project.removeAllMapLayers()
    context = QgsProcessingContext()
    context.setProject(project)
    extent = "333000,338000,5816000,5820000 [EPSG:32633]"  # around the changed block
    processing.runAndLoadResults("explora_geo:change", {
        "BEFORE": _layer(t33uuu_vrt, "2020"), "AFTER": _layer(after_4326, "2023"), "MODEL": str(bundle["embedder"]),
        "EXTENT": extent, "OUTPUT": "TEMPORARY_OUTPUT", "OUTPUT_GRID": "TEMPORARY_OUTPUT"}, context=context,
        feedback=Feedback.make())
    processing.runAndLoadResults("explora_geo:cluster", {
        "INPUT": _layer(t33uuu_vrt, "2020"), "MODEL": str(bundle["embedder"]), "EXTENT": extent, "CLUSTERS": 4,
        "OUTPUT": "TEMPORARY_OUTPUT"}, context=context, feedback=Feedback.make())
    nodes = project.layerTreeRoot().findLayers()
    assert [n.name() for n in nodes] == ["2020 — clusters (embedder)", "2020 → 2023 — change (embedder)",
                                         "2020 → 2023 — change grid (embedder)"]
    assert nodes[0].layer().renderer().type() == "paletted"
    assert [c.label for c in nodes[0].layer().renderer().classes()] == [f"cluster {i}" for i in range(1, 5)]
    assert nodes[1].layer().renderer().type() == "singlebandpseudocolor"
    project.removeAllMapLayers()
