"""`python -m prototxt`: rewrite the committed SphereFace-4/10/20/36/64 deploy and train prototxts."""
from base import cli
from prototxt.sphereface import HERE, write_all

PROG = "python -m prototxt"


@cli.entry(PROG)
def main(argv=None):
    ap = cli.parser(PROG, description=__doc__.split(":", 1)[1].strip())
    ap.add_argument("--folder", default=HERE, help="where to write them (default: prototxt/ of the repository)")
    a = ap.parse_args(argv)
    for path in write_all(a.folder):
        print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
