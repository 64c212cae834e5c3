"""The model package's one exception: what a caller handed it cannot be used."""


class ModelInputError(Exception):
    """A gene2vec table of the wrong shape, a file that is not a checkpoint, weights that do not fit, a layer that does
    not exist...: the message names the problem and the fix in one sentence, in the package's own terms (arguments
    and files, not any script's flags).

    The project's scripts raise the same class under the name `utils.ScbertError` and turn it into one line on stderr
    and exit code 2 (`utils.run_cli`).
    """
