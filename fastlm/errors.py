"""The exception types of the ops' argument checks. Each is the Python type that names the fault (ValueError for a
value, shape or device; TypeError for a dtype) and also a RuntimeError, the type torch's own ops raise for most of
the same faults (a class weight of the wrong size, a float target, input and target on two devices): code written
against torch's ops, `except RuntimeError`, catches fastlm's errors as it caught torch's."""


class ArgumentValueError(ValueError, RuntimeError):
    """A value, shape or device that an op cannot take."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A dtype that an op cannot take."""
