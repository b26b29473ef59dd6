"""What every CLI shares about its user's mistakes: one-line errors, validated numbers and paths.

A user's mistake (a bad flag value, a missing or corrupt file, a full disk) must end a command
with a single line naming the flag or file, never with a Python traceback. `user_errors`
wraps a click command's function so that the exceptions library code raises for such mistakes
become that line; anything else still ends in one line, with the traceback written to a file
for a bug report (or shown, with DIFFINSTRUCT_TRACEBACK=1).
"""

import contextlib
import errno
import functools
import math
import os
import pickle
import sys
import tempfile
import traceback
import zipfile

import click

TRACEBACK_ENV = 'DIFFINSTRUCT_TRACEBACK'

class UserError(Exception):
    """A one-line problem with what the user asked for (the message names the flag or file)."""

def one_line(text):
    """The first non-empty line of a message (library messages can span several)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ''

def describe_os_error(e):
    """'PATH: reason' for an OSError, with the remedy for a full disk."""
    path = e.filename if e.filename is not None else ''
    reason = e.strerror or one_line(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        reason = 'no space left on the device (free some space, or choose another folder)'
    elif e.errno == errno.EROFS:
        reason = 'read-only file system'
    return f'{path}: {reason}' if path else reason

def _message(e):
    if isinstance(e, OSError):
        return describe_os_error(e)
    if isinstance(e, EOFError):
        return f'unexpected end of file ({one_line(e) or "the file is truncated"})'
    return one_line(e) or type(e).__name__

# Exceptions whose message is a user-facing one-liner from library code, or whose cause is a
# file the user named (unreadable, truncated, full disk).
USER_EXCEPTIONS = (UserError, ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)

def user_errors(fn):
    """Decorator for a click command's function: user mistakes end in one `Error: ...` line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except USER_EXCEPTIONS as e:
            if os.environ.get(TRACEBACK_ENV) == '1':
                raise
            raise click.ClickException(_message(e)) from None
        except Exception as e: # pylint: disable=broad-except
            if os.environ.get(TRACEBACK_ENV) == '1':
                raise
            raise click.ClickException(f'internal error, {type(e).__name__}: {one_line(e)} '
                f'(traceback in {_save_traceback()}; please report it)') from None
    return wrapper

def _save_traceback():
    try:
        fd, path = tempfile.mkstemp(prefix='diffinstruct-traceback-', suffix='.txt')
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(traceback.format_exc())
        return path
    except OSError:
        return f'nowhere: the disk is not writable; rerun with {TRACEBACK_ENV}=1'

class _OneLineErrors:
    """click's standalone handling, except that a usage error is one line (click prints the
    usage text above it): `Error: Invalid value for '--lr': 'nan' is not a finite number.`"""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            click.echo(f'Error: {e.format_message()}', err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo('Aborted!', err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

class Command(_OneLineErrors, click.Command):
    """@click.command(cls=cli.Command): one-line usage errors."""

class Group(_OneLineErrors, click.Group):
    """@click.group(cls=cli.Group): one-line usage errors in every subcommand."""

@contextlib.contextmanager
def run_log(path, enabled=True):
    """Copy everything printed to `path` (a run folder's log.txt, appended on resume) while the
    block runs; an exception's one-line description is logged too. Always restores the streams."""
    if not enabled:
        yield
        return
    import dnnlib # pylint: disable=import-outside-toplevel
    logger = dnnlib.util.Logger(path, file_mode='a')
    try:
        yield
    except Exception as e:
        try:
            logger.file.write(f'Error: {_message(e)}\n')
        except (OSError, ValueError): # a full disk: the message still reaches the terminal
            pass
        raise
    finally:
        try:
            logger.close()
        except OSError:
            pass

#----------------------------------------------------------------------------
# Numbers.

class FiniteFloat(click.FloatRange):
    """A click float range that also refuses nan and inf (they would run to garbage)."""
    name = 'float'

    def _describe_range(self):
        return '' if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return number

def positive_float():
    return FiniteFloat(min=0, min_open=True)

def nonnegative_float():
    return FiniteFloat(min=0)

#----------------------------------------------------------------------------
# Paths.

def check_writable_dir(path, flag):
    """Fail now, before any work, if `path` cannot be (or be made) a writable directory.

    Creates nothing: checks the nearest existing ancestor by writing (and removing) a temporary
    file in it, which also catches read-only file systems and a root user's bypassed modes.
    """
    if not path:
        raise click.BadParameter('an output directory is required', param_hint=flag)
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise click.BadParameter(f'{path} exists and is not a directory', param_hint=flag)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise click.BadParameter(f'cannot create {path}: {existing} is a file', param_hint=flag)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise click.BadParameter(f'cannot write in {existing}: {describe_os_error(e).split(": ", 1)[-1]}',
            param_hint=flag) from None

def check_writable_file(path, flag):
    """Fail now if a file cannot be written at `path` (its folder missing is fine: made later)."""
    if os.path.isdir(path):
        raise click.BadParameter(f'{path} is a directory', param_hint=flag)
    check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)

def check_readable(path, flag, what='file'):
    """A one-line error now for an input that does not exist."""
    if path is None or '://' in path:
        return
    if not os.path.exists(path):
        raise click.BadParameter(f'{path}: no such {what}', param_hint=flag)
