"""
Assemble infer/index.html: the page template with its CSS and script inlined, and the worker (the
Emscripten engine with its WebAssembly embedded as base64, followed by src/worker.js) inlined as text
that the page turns into a blob: worker. One file, so it works when opened straight from disk.

    python infer/build_page.py infer/build/nano_engine.js infer/index.html   (make -C infer runs this)

The page records a SHA-256 of every source it is built from (sources_sha256), so a test can tell,
without any toolchain, whether the committed index.html is older than its sources.
"""

import hashlib
import os
import sys

INFER_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(INFER_DIR)

# everything the page is built from, relative to the repository root (the engine JS is derived from these)
SOURCES = [
    "infer_c/nano.h", "infer_c/nano.c", "infer_c/bpe.h", "infer_c/bpe.c", "infer_c/unicode_classes.h",
    "infer/wasm_api.c", "infer/Makefile",
    "infer/build_page.py",
    "infer/src/page.html", "infer/src/page.css", "infer/src/page.js", "infer/src/worker.js",
]


def sources_sha256():
    digest = hashlib.sha256()
    for path in SOURCES:
        with open(os.path.join(ROOT, path), "rb") as f:
            data = f.read()
        digest.update(f"{path}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def read_source(name):
    with open(os.path.join(INFER_DIR, "src", name), encoding="utf-8") as f:
        return f.read()


def inline_script(text, what):
    # "</script" would end the inline <script> element early
    if "</script" in text.lower():
        raise SystemExit(f"build_page.py: {what} contains '</script' and cannot be inlined")
    return text


def build_page(engine_js_path):
    with open(engine_js_path, encoding="utf-8") as f:
        engine_js = f.read()
    worker = inline_script(engine_js + "\n" + read_source("worker.js"), "the worker")
    replacements = {
        "@SOURCES_SHA256@": sources_sha256(),
        "@PAGE_CSS@": read_source("page.css"),
        "@WORKER_SOURCE@": worker,
        "@PAGE_SCRIPT@": inline_script(read_source("page.js"), "src/page.js"),
    }
    page = read_source("page.html")
    for placeholder, text in replacements.items():
        if page.count(placeholder) != 1:
            raise SystemExit(f"build_page.py: src/page.html must hold {placeholder} exactly once")
        page = page.replace(placeholder, text)
    return page


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: python build_page.py ENGINE_JS OUTPUT_HTML")
    engine_js_path, output_path = sys.argv[1:]
    page = build_page(engine_js_path)
    temporary = output_path + ".tmp"
    with open(temporary, "w", encoding="utf-8", newline="\n") as f:
        f.write(page)
    os.replace(temporary, output_path)
    print(f"wrote {output_path} ({len(page.encode()) / 1e3:.0f} kB, sources {sources_sha256()[:12]})")


if __name__ == "__main__":
    main()
