"""Post-training quantization with calibration data: observers, the
Calibrator, GPTQ and AWQ-style weight algorithms, automatic mixed precision."""
from .calibrator import Calibrator, calibrate
from .observers import (OBSERVERS, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, Observer,
                        PercentileObserver, PerChannelMinMaxObserver, make_observer, qparams_from_range)

__all__ = ["Calibrator", "calibrate", "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver",
           "PerChannelMinMaxObserver", "PercentileObserver", "MSEObserver", "OBSERVERS", "make_observer",
           "qparams_from_range"]


# ``lowbit.calibrate`` is both this package (the folder DESIGN.md names) and the
# function ``lowbit.calibrate(model, data)`` (the public API). Importing the
# package binds the name to the package, so the package itself is made callable.
class _CallablePackage(__import__("types").ModuleType):
    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallablePackage
