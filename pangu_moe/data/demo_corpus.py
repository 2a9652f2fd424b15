"""The built-in demo corpus, from text that ships with every CPython installation.

Two domains:
- `prose`: the language-reference and library help topics in `pydoc_data.topics` (English prose
  with code snippets), one document per topic, sorted by topic name;
- `code`: the standard library's `.py` sources, sorted by relative path, skipping the folders
  `test`, `tests`, `idlelib`, `lib2to3` (test data and odd encodings), `__pycache__` and
  `site-packages` (not part of the standard library), and the few files that are not UTF-8.
The content therefore depends on the Python version, but is fixed for a given installation.
"""
import os
import sysconfig

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3"}


def documents(max_bytes_per_domain):
    """{"prose": [text, ...], "code": [text, ...]}, each list capped near `max_bytes_per_domain` bytes."""
    from pydoc_data import topics
    prose = [topics.topics[k] for k in sorted(topics.topics)]
    return {"prose": _capped(prose, max_bytes_per_domain), "code": _stdlib_sources(max_bytes_per_domain)}


def _capped(texts, max_bytes):
    out, total = [], 0
    for t in texts:
        if total >= max_bytes:
            break
        out.append(t)
        total += len(t.encode("utf-8"))
    return out


def _stdlib_sources(max_bytes):
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    out, total = [], 0
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        if total >= max_bytes:
            break
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append(text)
        total += len(raw)
    return out
