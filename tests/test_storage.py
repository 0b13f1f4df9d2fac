"""Storage: schema-checked, atomic, idempotent writes; readers never see partial files."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from xai_audit.storage.maps import decode_map, encode_heatmap, encode_map
from xai_audit.storage.parquet import ResultsStore, StorageError, file_schema_version
from xai_audit.storage.query import run_query
from xai_audit.storage.runs import RunRecord, list_runs, new_run_id
from xai_audit.storage.schemas import SCHEMA_VERSION, TABLES

ERROR_ROW = {"stage": "explain", "item_id": "a.jpg", "error_type": "ImageDecodeError", "message": "truncated"}


def test_rewriting_a_unit_replaces_it_instead_of_duplicating(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("errors", "r1", "unit-1", [ERROR_ROW, {**ERROR_ROW, "item_id": "b.jpg"}])
    store.write("errors", "r1", "unit-1", [ERROR_ROW, {**ERROR_ROW, "item_id": "b.jpg"}])
    assert len(store.read("errors")) == 2
    store.write("errors", "r1", "unit-2", [ERROR_ROW])
    assert len(store.read("errors", "r1")) == 3


def test_crash_between_temp_write_and_rename_leaves_no_visible_file(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError):
        store.write("errors", "r1", "unit-1", [ERROR_ROW])
    monkeypatch.undo()
    assert store.files("errors") == []
    assert store.read("errors").empty
    assert list((tmp_path / "errors").rglob("*")) == [tmp_path / "errors" / "run_id=r1"]


def test_a_leftover_temp_file_is_invisible_to_readers(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("errors", "r1", "unit-1", [ERROR_ROW])
    folder = tmp_path / "errors" / "run_id=r1"
    (folder / ".tmp-deadbeef-unit-2.parquet").write_bytes(b"PAR1 half written")
    assert len(store.read("errors")) == 1
    assert run_query(store, "select count(*) as n from errors")["n"][0] == 1


def test_rows_are_validated_against_the_schema(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(StorageError, match="no column"):
        store.write("errors", "r1", "u", [{**ERROR_ROW, "colour": "red"}])
    with pytest.raises(StorageError, match="schema"):
        store.write("predictions", "r1", "u", [{"model": "m", "image_id": "a", "label": "not a number"}])
    assert store.files("errors") == [] and store.files("predictions") == []


def test_files_carry_the_schema_version(tmp_path):
    store = ResultsStore(tmp_path)
    path = store.write("errors", "r1", "u", [ERROR_ROW])
    assert file_schema_version(store, path) == SCHEMA_VERSION
    assert ["run_id"] + pq.read_table(path).schema.names == TABLES["errors"].names


def test_tables_read_with_plain_pandas_pyarrow_and_duckdb(tmp_path):
    import duckdb
    import pyarrow.dataset as ds

    store = ResultsStore(tmp_path)
    store.write("errors", "r1", "u", [ERROR_ROW])
    store.write("errors", "r2", "u", [ERROR_ROW, ERROR_ROW])
    by_pandas = pd.read_parquet(tmp_path / "errors")
    assert by_pandas["run_id"].astype(str).value_counts().to_dict() == {"r2": 2, "r1": 1}
    by_arrow = ds.dataset(tmp_path / "errors", format="parquet", partitioning="hive").to_table()
    assert sorted(by_arrow.column("run_id").to_pylist()) == ["r1", "r2", "r2"]
    by_duckdb = duckdb.sql(
        f"select run_id, count(*) from '{tmp_path}/errors/*/*.parquet' group by run_id order by run_id"
    ).fetchall()
    assert by_duckdb == [("r1", 1), ("r2", 2)]


def test_unit_names_cannot_escape_the_table_folder(tmp_path):
    store = ResultsStore(tmp_path / "root")
    path = store.write("errors", "../../r1", "../../../evil", [ERROR_ROW])
    assert os.path.realpath(path).startswith(os.path.realpath(tmp_path / "root" / "errors"))


def test_query_exposes_every_table_even_when_empty(tmp_path):
    store = ResultsStore(tmp_path)
    for table, schema in TABLES.items():
        frame = run_query(store, f"select * from {table}")
        assert list(frame.columns) == schema.names and frame.empty


def test_query_reads_rows_of_every_table(tmp_path):
    store = ResultsStore(tmp_path)
    base = {"model": "m", "image_id": "a.png", "method": "gradcam"}
    samples = {
        "images": {
            "image_id": "a.png",
            "chunk": 0,
            "path": "/data/a.png",
            "label": 1,
            "label_name": "circle",
            "mask_path": None,
            "box": [0, 0, 4, 4],
        },
        "predictions": {
            "model": "m",
            "image_id": "a.png",
            "label": 1,
            "label_name": "circle",
            "prob": 0.9,
            "topk": [{"label": 1, "name": "circle", "prob": 0.9}],
        },
        "neurons": {
            "model": "m",
            "layer": "layer4",
            "unit": 3,
            "method": "netdissect",
            "concept": "red",
            "category": "color",
            "score": 0.3,
            "top_concepts": [{"concept": "red", "score": 0.3}],
            "top_images": ["a.png"],
        },
        "saliency": {**base, "target": 1, **encode_map(np.ones((2, 2)))},
        "agreement": {
            "model": "m",
            "image_id": "a.png",
            "method_a": "gradcam",
            "method_b": "lime",
            "iou": 0.5,
            "spearman": 0.2,
            "com_distance": 0.1,
            "rule": "top_q:0.2",
        },
        "localization": {**base, "pointing_hit": True, "iou_gt": 0.4, "energy_in_gt": 0.7},
        "faithfulness": {**base, "deletion_auc": 0.1, "insertion_auc": 0.8},
        "lime_trials": {"model": "m", "image_id": "a.png", "params_json": "{}", "objective": 0.3, "seconds": 1.0},
        "lime_uncertainty": {"model": "m", "image_id": "a.png", "samples_used": 224, "std_errors": [0.01, 0.02]},
        "scores": {**base, "metric": "toy", "value": 0.25},
        "unit_contributions": {
            "model": "m",
            "image_id": "a.png",
            "target": 1,
            "layer": "layer4",
            "contributions": [0.5, -0.1],
            "logit": 0.4,
        },
        "concept_attribution": {
            "model": "m",
            "image_id": "a.png",
            "target": 1,
            "method": "netdissect",
            "layer": "layer4",
            "concept": "red",
            "rank": 1,
            "units": 1,
            "contribution": 0.5,
            "share": 1.0,
            **encode_heatmap(np.ones((2, 2))),
        },
        "sanity": {
            **base,
            "test": "cascading",
            "step": 1,
            "layer": "fc",
            "target": 1,
            "spearman": 0.2,
            "ssim": 0.3,
            "iou": 0.1,
            **encode_map(np.ones((2, 2))),
        },
        "label_checks": {
            "model": "m",
            "check": "final_layer",
            "layer": "fc",
            "concept_set": "classes",
            "similarity": "soft_wpmi",
            "unit": 1,
            "class_name": "circle",
            "concept": "circle",
            "score": 1.6,
            "correct": True,
            "text_similarity": 1.0,
        },
        "errors": ERROR_ROW,
    }
    assert set(samples) | {"runs"} == set(TABLES)
    for table, row in samples.items():
        store.write(table, "r1", "u", [row])
    RunRecord(run_id="r1", config_name="c", config_json="{}", config_hash="h", device="cpu").save(store)
    for table in TABLES:
        answer = run_query(store, f"select count(*) as n, min(run_id) as run from {table}")
        assert (answer["n"][0], answer["run"][0]) == (1, "r1"), table


def test_saliency_maps_round_trip_through_float16():
    saliency_map = np.random.default_rng(0).random((7, 5)).astype(np.float32)
    decoded = decode_map(encode_map(saliency_map))
    assert decoded.shape == (7, 5)
    assert np.abs(decoded - saliency_map).max() < 1e-3


def test_run_record_round_trips_and_lists_newest_first(tmp_path):
    store = ResultsStore(tmp_path)
    first = RunRecord(run_id=new_run_id("demo"), config_name="demo", config_json="{}", config_hash="h", device="cpu")
    first.save(store)
    second = RunRecord(
        run_id=new_run_id("demo"),
        config_name="demo",
        config_json="{}",
        config_hash="h",
        device="cpu",
        started_at=first.started_at + pd.Timedelta(seconds=5),
    )
    second.status, second.finished_at, second.timings = (
        "completed",
        second.started_at + pd.Timedelta(seconds=2),
        {"explain": 1.5},
    )
    second.save(store)
    loaded = RunRecord.load(store, second.run_id)
    assert (loaded.status, loaded.timings) == ("completed", {"explain": 1.5})
    assert "torch" in loaded.versions and "prefect" in loaded.versions
    runs = list_runs(store)
    assert runs["run_id"].tolist() == [second.run_id, first.run_id]
    assert runs["seconds"][0] == pytest.approx(2.0)
