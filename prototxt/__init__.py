"""Net definitions: SphereFace-4/10/20/36/64 (`prototxt.sphereface`), other face nets (`prototxt.facenets`) and the
committed prototxts beside this file."""
import base  # noqa: F401  (quiets glog before caffe is imported)

from base.errors import ToolkitError


class NetSpecError(ToolkitError):
    """Settings no net can be made of (a depth, width or variant out of range)."""
