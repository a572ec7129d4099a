#!/usr/bin/env python3
"""Build the `general` and `system` domains of a sigma corpus from Debian packages.

general: fortune cookies from the `fortunes` / `fortunes-min` packages, one
         document per fortune (quotes, literature, science, humour).
system:  manual pages rendered to plain text with man(1), one document per page,
         from the packages named below (Linux man-pages, coreutils, iproute2, ...).

Each output line is JSON: {"text": ..., "source": ..., "package": ...}; the licenses
of the packages used are listed in LICENSES below and in data/sample/ATTRIBUTION.md.
The selection is a sorted, deterministic function of the installed packages, so
the same Debian release gives the same corpus. `--scale large` takes every
installed manual page and every fortune file, for GPU-scale experiments.

Usage: corpus_from_debian.py --scale sample|large --output DIR
"""
import argparse
import gzip
import json
import os
import subprocess
import sys

FORTUNE_DIR = "/usr/share/games/fortunes"
# Fortune files used for the small sample (the rest of the package is added at large scale).
SAMPLE_FORTUNES = [
    "art", "computers", "cookie", "definitions", "education", "food", "fortunes",
    "goedel", "humorists", "kids", "law", "linuxcookie", "literature", "love",
    "magic", "medicine", "miscellaneous", "news", "people", "pets", "platitudes",
    "riddles", "science", "songs-poems", "sports", "startrek", "wisdom", "work",
    "zippy",
]
SKIP_FORTUNES = {"drugs", "ethnic", "men-women", "off"}
SAMPLE_MAN_PACKAGES = ["manpages", "coreutils", "iproute2", "procps", "util-linux"]
SAMPLE_MAN_PAGES_PER_PACKAGE = 90
LICENSES = {
    "fortunes": "BSD-4-Clause (fortune-mod); see /usr/share/doc/fortunes/copyright",
    "fortunes-min": "BSD-4-Clause (fortune-mod); see /usr/share/doc/fortunes-min/copyright",
    "manpages": "Linux man-pages licenses (verbatim copying permitted); see /usr/share/doc/manpages/copyright",
    "coreutils": "GPL-3.0-or-later; see /usr/share/doc/coreutils/copyright",
    "iproute2": "GPL-2.0; see /usr/share/doc/iproute2/copyright",
    "procps": "GPL-2.0-or-later / LGPL-2.0-or-later; see /usr/share/doc/procps/copyright",
    "util-linux": "GPL-2.0-or-later and others; see /usr/share/doc/util-linux/copyright",
}


def package_files(package):
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: Debian package '{package}' is not installed (apt-get install {package})")
    return sorted(out.stdout.split())


def fortunes(names, package_of):
    for name in names:
        path = os.path.join(FORTUNE_DIR, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="strict") as f:
            raw = f.read()
        for i, chunk in enumerate(raw.split("\n%\n")):
            text = chunk.strip("%\n ")
            if len(text) >= 40:
                pkg = package_of.get(path, "fortunes")
                yield {"text": text + "\n", "source": f"fortune:{name}#{i}", "package": pkg}


def render_man(path):
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="", LANG="C.UTF-8")
    man = subprocess.run(["man", "-l", "-E", "UTF-8", path], capture_output=True, env=env)
    if man.returncode != 0 or not man.stdout:
        return None
    col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True)
    text = col.stdout.decode("utf-8", errors="replace")
    return text if len(text) > 200 else None


def man_pages(packages, per_package):
    """Rendered pages in a fixed order; rendering runs on all cores (order kept)."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = []
    for pkg in packages:
        pages = [p for p in package_files(pkg)
                 if "/share/man/man" in p and p.endswith(".gz") and not os.path.islink(p)]
        if per_package:
            pages = pages[:per_package]
        jobs.extend((pkg, path) for path in pages)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for (pkg, path), text in zip(jobs, pool.map(render_man, [p for _, p in jobs], chunksize=16)):
            if text:
                yield {"text": text, "source": "man:" + os.path.basename(path)[:-3], "package": pkg}


def installed_man_packages():
    """Every installed package that ships English manual pages (large scale)."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\n"], capture_output=True, text=True)
    return sorted(set(out.stdout.split()))


def write_jsonl(path, docs, used):
    tmp = path + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            used.add(d["package"])
            n += 1
    os.replace(tmp, path)
    print(f"wrote {n} documents to {path}", file=sys.stderr)


def write_attribution(path, used):
    lines = ["# Attribution", "",
             "The `general` and `system` sample documents are text from these Debian packages",
             "(fortunes split one per document; manual pages rendered by man(1)). Each",
             "document's `package` field names its package. Licenses:", ""]
    for pkg in sorted(used):
        ver = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True).stdout
        lines.append(f"- `{pkg}` {ver}: {LICENSES.get(pkg, 'see /usr/share/doc/' + pkg + '/copyright')}")
    lines += ["", "The `synthetic` documents are generated by `sigma data synth` (this project's code).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["sample", "large"], required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    os.makedirs(args.output, exist_ok=True)
    package_of = {}
    for pkg in ("fortunes", "fortunes-min"):
        for p in package_files(pkg):
            package_of[p] = pkg
    if args.scale == "sample":
        names, pkgs, per = SAMPLE_FORTUNES, SAMPLE_MAN_PACKAGES, SAMPLE_MAN_PAGES_PER_PACKAGE
    else:
        names = sorted(n for n in os.listdir(FORTUNE_DIR)
                       if "." not in n and n not in SKIP_FORTUNES)
        pkgs, per = installed_man_packages(), 0
    used = set()
    write_jsonl(os.path.join(args.output, "general.jsonl"), fortunes(names, package_of), used)
    write_jsonl(os.path.join(args.output, "system.jsonl"), man_pages(pkgs, per), used)
    write_attribution(os.path.join(args.output, "ATTRIBUTION.md"), used)


if __name__ == "__main__":
    main()
