"""Files beside the Delta tables (the FAISS template index) on any file system the cluster reaches.

A plain path (``/Volumes/...``, ``./lake/_index``) is read and written with the local file API.
A URI (``s3://``, ``dbfs:/``, ``abfss://``, ``gs://``, ``file://``) goes through Hadoop's
``FileSystem`` in the Spark driver's JVM, so whatever connectors and credentials the cluster has
for its Delta tables serve the index too, and no Python client (s3fs, adlfs, ...) is needed.
Executors never read a URI themselves: :func:`distribute` hands the directory to
``SparkContext.addFile`` and workers open their local copy (``SparkFiles.get``).

Needs a classic Spark session (``spark._jvm``) for URIs; Spark Connect has no JVM gateway, so
there give the index a local path (``index.path``, e.g. a ``/Volumes/...`` path on Databricks).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["is_uri", "join", "root", "hadoop_fs", "exists", "listdir", "newest_mtime", "remove_tree", "read_text",
           "write_text", "put_dir", "distribute", "local_copy", "work_dir", "cache_dir", "children"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters or more: not a Windows drive


def is_uri(path: str) -> bool:
    """True when ``path`` names a scheme (``s3://b/k``, ``dbfs:/x``, ``file:///x``)."""
    return bool(_SCHEME.match(path))


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for both local paths and URIs (URIs always use ``/``)."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def root(path: str) -> str:
    """A lake or index root as stored in run records: URIs as given, local paths made absolute."""
    return path if is_uri(path) else os.path.abspath(path)


def hadoop_fs(spark, path: str):
    """``(jvm, FileSystem, Path)`` of ``path`` from the driver's Hadoop configuration (the
    cluster's connectors and credentials).

    Raises:
        RuntimeError: no classic Spark session (Spark Connect has no JVM gateway).
    """
    if spark is None or getattr(spark, "_jvm", None) is None:
        raise RuntimeError(f"{path} is a URI: reading or writing it needs a classic Spark session "
                           "(Hadoop FileSystem in the driver JVM); under Spark Connect use a local "
                           "or mounted path such as /Volumes/... (lake, index.path)")
    jvm = spark._jvm  # noqa: SLF001
    p = jvm.org.apache.hadoop.fs.Path(path)
    return jvm, p.getFileSystem(spark._jsc.hadoopConfiguration()), p  # noqa: SLF001


def exists(spark, path: str) -> bool:
    """Whether ``path`` exists (file or directory)."""
    if not is_uri(path):
        return os.path.exists(path)
    _, fs, p = hadoop_fs(spark, path)
    return bool(fs.exists(p))


def listdir(spark, path: str) -> list[str]:
    """Sorted names of the files directly under the directory ``path``; [] when it is missing."""
    if not is_uri(path):
        if not os.path.isdir(path):
            return []
        return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    _, fs, p = hadoop_fs(spark, path)
    if not fs.exists(p):
        return []
    return sorted(st.getPath().getName() for st in fs.listStatus(p) if st.isFile())


def children(spark, path: str) -> list[str]:
    """Sorted names of the files and folders directly under ``path``; [] when it is missing."""
    if not is_uri(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    _, fs, p = hadoop_fs(spark, path)
    if not fs.exists(p):
        return []
    return sorted(st.getPath().getName() for st in fs.listStatus(p))


def newest_mtime(spark, path: str) -> float:
    """The latest modification time (seconds since the epoch) of the directory ``path`` and the
    entries directly under it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not is_uri(path):
        return max([os.stat(path).st_mtime] +
                   [os.stat(os.path.join(path, n)).st_mtime for n in os.listdir(path)])
    _, fs, p = hadoop_fs(spark, path)
    if not fs.exists(p):
        raise FileNotFoundError(path)
    return max([fs.getFileStatus(p).getModificationTime()] +
               [st.getModificationTime() for st in fs.listStatus(p)]) / 1000.0


def remove_tree(spark, path: str) -> None:
    """Delete the directory ``path`` and everything under it; nothing happens when it is missing."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    _, fs, p = hadoop_fs(spark, path)
    if fs.exists(p):
        fs.delete(p, True)


def read_text(spark, path: str) -> str:
    """The UTF-8 text of the file at ``path``.

    Raises:
        FileNotFoundError: no such file.
    """
    if not is_uri(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    jvm, fs, p = hadoop_fs(spark, path)
    if not fs.exists(p):
        raise FileNotFoundError(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "file")
        fs.copyToLocalFile(False, p, jvm.org.apache.hadoop.fs.Path(local), True)
        with open(local, encoding="utf-8") as f:
            return f.read()


def write_text(spark, path: str, text: str) -> None:
    """Replace the file at ``path`` with ``text`` (UTF-8). Readers see the old or the new file:
    locally through a rename, on object stores because a single PUT is atomic."""
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    jvm, fs, p = hadoop_fs(spark, path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path.rstrip("/")) or "file")
        with open(local, "w", encoding="utf-8") as f:
            f.write(text)
        fs.copyFromLocalFile(False, True, jvm.org.apache.hadoop.fs.Path(local), p)


def put_dir(spark, local_dir: str, dest: str, last: str | None = None) -> None:
    """Copy the files of ``local_dir`` (not recursive) into the directory ``dest``, overwriting;
    the file named ``last`` is copied after all others (a marker that the folder is complete)."""
    names = sorted((n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n))),
                   key=lambda n: (n == last, n))
    if not is_uri(dest):
        os.makedirs(dest, exist_ok=True)
        for n in names:
            shutil.copyfile(os.path.join(local_dir, n), os.path.join(dest, n))
        return
    jvm, fs, p = hadoop_fs(spark, dest)
    fs.mkdirs(p)
    for n in names:
        fs.copyFromLocalFile(False, True, jvm.org.apache.hadoop.fs.Path(os.path.join(local_dir, n)),
                             jvm.org.apache.hadoop.fs.Path(join(dest, n)))


def distribute(spark, path: str) -> tuple[str, bool]:
    """Make the directory ``path`` readable by every executor.

    Returns:
        ``(path, False)`` for a local path (executors are expected to see it: local mode, a FUSE
        mount such as ``/Volumes``, NFS); ``(name, True)`` for a URI, after
        ``SparkContext.addFile(path, recursive=True)``: a worker opens ``SparkFiles.get(name)``
        (see :func:`local_copy`). Adding the same path again in one Spark application is a no-op.
    """
    if not is_uri(path):
        return path, False
    spark.sparkContext.addFile(path, recursive=True)
    return os.path.basename(path.rstrip("/")), True


def local_copy(name_or_path: str, distributed: bool) -> str:
    """On an executor: the local path of what :func:`distribute` returned."""
    if not distributed:
        return name_or_path
    from pyspark import SparkFiles

    return SparkFiles.get(name_or_path)


def cache_dir() -> Path:
    """finelake's local cache folder (created): ``$FINELAKE_CACHE``, else ``~/.cache/finelake``
    (converted models, built wheels, files a run writes locally before copying them to a URI)."""
    d = Path(os.environ.get("FINELAKE_CACHE", Path.home() / ".cache" / "finelake"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def work_dir(dest: str, kind: str) -> str:
    """A local folder to write what ends up at ``dest`` (checkpoints, a model, a report).

    A plain path is used as is (created). For a URI (``dbfs:/...``, ``s3://...``) the files are
    written locally first, under ``$FINELAKE_CACHE/<kind>/<last part of dest>``, and the caller
    copies them to ``dest`` with :func:`put_dir` (never into a local folder literally named
    ``dbfs:`` or ``s3:``).
    """
    if not is_uri(dest):
        os.makedirs(dest, exist_ok=True)
        return dest
    local = os.path.join(str(cache_dir()), kind, os.path.basename(dest.rstrip("/")))
    os.makedirs(local, exist_ok=True)
    return local

