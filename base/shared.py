"""Where the data and models at hand are (LFW, ORL, MobileFaceNet)."""
import os


def shared_dir():
    """$SPHEREFACE_SHARED, or ``shared`` beside the repository.  Only defaults, benchmarks and tests look
    here; every tool takes its data and models by path."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("SPHEREFACE_SHARED", os.path.join(os.path.dirname(repo), "shared"))
