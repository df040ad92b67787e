"""`python -m prototxt`: rewrite the committed SphereFace-4/10/20/36/64 deploy and train prototxts."""
import argparse

from prototxt.sphereface import write_all

argparse.ArgumentParser(prog="python -m prototxt", description=__doc__.split(":", 1)[1].strip()).parse_args()
for path in write_all():
    print(path)
