"""The one exception type a user ever sees: it names the file, the layer and the problem on one line."""

from __future__ import annotations


class DeepRebirthError(Exception):
    """A problem with the user's input (exit code 2), rendered as ``file: layer 'x': message``.

    The message names concepts ("no weights given"), never a front end's spelling of them: ``options`` lists the
    API parameters it is about (``"weights"``), and the command line adds its flags for those (``--weights``)."""

    def __init__(self, message: str, *, file: str | None = None, layer: str | None = None,
                 options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.layer = layer
        self.options = options

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled with its file, layer and options (an isolated Caffe run raises it in a child process)."""
        return (self.__class__, (self.message,), self.__dict__)

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.layer:
            parts.append(f"layer '{self.layer}'")
        parts.append(self.message)
        return _one_line(": ".join(parts))


def _one_line(text: str) -> str:
    """Escape line breaks and other unprintable characters: messages quote names and text from the user's files,
    and an error must stay one line whatever those hold."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
