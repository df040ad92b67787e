"""Print the Debian archive URI this machine's apt already uses.

setup.sh needs a mirror for the bullseye source package of Caffe but must not
hard-code a host name; it borrows the URI of the entry that serves this
machine's own release (not -security, not -updates).  Stdlib only: it runs
before the virtual environment exists.

Usage: python3 scripts/apt_mirror.py [SOURCES_FILE ...]
"""
import glob
import sys


def _one_line_entries(text):
    # "deb [opts] URI SUITE COMPONENT..."
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        if words[1].startswith("["):
            while words and not words[0].endswith("]"):
                words.pop(0)
            words.pop(0)
            words.insert(0, "deb")
        yield words[1], [words[2]], words[3:]


def _deb822_entries(text):
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if fields.get("enabled", ["yes"])[0].lower() == "no":
            continue
        for uri in fields.get("uris", []):
            yield uri, fields.get("suites", []), fields.get("components", [])


def entries(paths):
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parse = _deb822_entries if path.endswith(".sources") else _one_line_entries
        yield from parse(text)


def os_codename(path="/etc/os-release"):
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    return line.split("=", 1)[1].strip().strip('"') or None
    except OSError:
        pass
    return None


def debian_mirror(paths, codename):
    """First URI serving `codename` itself (the release suite) with main."""
    for uri, suites, components in entries(paths):
        if codename in suites and "main" in components:
            return uri.rstrip("/")
    return None


def main(argv):
    paths = argv or ["/etc/apt/sources.list"] + sorted(
        glob.glob("/etc/apt/sources.list.d/*.list")
        + glob.glob("/etc/apt/sources.list.d/*.sources"))
    codename = os_codename()
    uri = debian_mirror(paths, codename) if codename else None
    if uri is None:
        sys.stderr.write("no apt entry for the Debian release suite %r in: %s\n"
                         % (codename, " ".join(paths)))
        return 1
    print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
