"""Named errors. Every user-facing failure is one of these, with a message that says
which file / node / op / option is wrong."""


class NNSculptError(Exception):
    """Base class of all nnsculpt errors (the CLI prints ``ClassName: message``)."""


class IRError(NNSculptError):
    """The IR was used inconsistently (a bug in a pass or a malformed graph)."""


class VerificationError(IRError):
    """The verifier found a broken invariant; the message lists the offending nodes."""


class ModelLoadError(NNSculptError):
    """A model file could not be read: missing, truncated, not ONNX, or invalid."""


class UnsupportedOpError(NNSculptError):
    """An op cannot be handled by this lowering/frontend (names the node and op)."""


class PipelineError(NNSculptError):
    """A pipeline string or recipe is malformed."""


class UnknownPassError(PipelineError):
    """A pipeline names a pass that is not registered."""


class PassOptionError(PipelineError):
    """A pass option is unknown or has a bad value."""


class InputDataError(NNSculptError):
    """Input data (.npz) does not match the model: missing input, wrong dtype/shape."""


class NumericsError(NNSculptError):
    """A pass changed the model outputs beyond the allowed tolerance."""


class AlreadyQuantizedError(NNSculptError):
    """A quantization pass was asked to quantize a model that is already quantized."""


class MissingCalibrationDataError(InputDataError):
    """A data-driven pass (calibration, activation / Taylor importance) ran without calibration data."""


class RequirementError(NNSculptError):
    """A pass's declared requirement (``opset>=13``, ``bn-folded``...) is unknown or cannot be met."""


class DriftError(NumericsError):
    """A lossy pass moved the outputs further than the user allowed (``--max-drift``)."""


class PackError(NNSculptError):
    """An nnsculpt container (``nnsculpt pack``) cannot be unpacked: not a container, truncated,
    or corrupted (checksum mismatch); the message names the file and the problem."""
