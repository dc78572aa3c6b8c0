"""storage.work_dir: train and compare write locally, never into a folder named after a URI."""

from __future__ import annotations

import os

from finelake import storage


def test_local_destination_is_used_as_is(tmp_path):
    dest = str(tmp_path / "lake" / "_models" / "r1_pairs_lora")
    assert storage.work_dir(dest, "train") == dest and os.path.isdir(dest)


def test_uri_destination_gets_a_local_work_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FINELAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for dest in ("dbfs:/Volumes/main/finelake/lake/_models/r1_pairs_lora",
                 "s3://bucket/finelake/lake/_models/r1_pairs_lora"):
        local = storage.work_dir(dest, "train")
        assert local == str(tmp_path / "cache" / "train" / "r1_pairs_lora")
        assert os.path.isdir(local)
    assert not (tmp_path / "dbfs:").exists() and not (tmp_path / "s3:").exists()
