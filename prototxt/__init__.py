"""Net definitions: SphereFace-4/10/20/36/64 (`prototxt.sphereface`) and the committed prototxts beside this file."""
