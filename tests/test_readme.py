"""The README is a user's document whose commands run as written: every flag of every command
in its code blocks exists in that CLI, every CLI's --help shows defaults, and the commands that
need no download or GPU run (--dry-run where they would train)."""

import ast
import inspect
import os
import re
import shlex

import pytest
from click.testing import CliRunner

import dataset_tool
import fid
import generate
from refine import api, run
from tests.scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
CLIS = dict(refine=load_script('refine.py', 'refine_cli_readme').main, generate=generate.main,
    fid=fid.main, train=load_script('train.py', 'train_cli_readme').main, dataset_tool=dataset_tool.main)

def readme_commands():
    """(cli name, argv) of every python/torchrun command in the README's code blocks and in
    its tables' inline code (`python refine.py ...` in an example column)."""
    text = open(README, encoding='utf-8').read()
    commands = []
    inline = [cell for row in re.findall(r'^\|.*\|$', text, re.M)
        for cell in re.findall(r'`((?:python|torchrun) [^`]+)`', row)]
    for block in re.findall(r'```\n(.*?)```', text, re.S) + inline:
        for line in block.replace('\\\n', ' ').splitlines():
            if not line.startswith(('python ', 'torchrun ')):
                continue
            words = shlex.split(line, comments=True)
            words = [w for w in words if not w.startswith('--nproc_per_node')]
            if len(words) >= 2 and words[0] in ('python', 'torchrun') and words[1].endswith('.py'):
                name = os.path.splitext(words[1])[0]
                if name in CLIS:
                    commands.append((name, words[2:]))
    return commands

def _option_names(command, argv):
    """The options a click command (or the subcommand argv names) accepts."""
    if hasattr(command, 'commands'): # fid.py: a group
        command = command.commands[argv[0]]
    return {opt for p in command.params for opt in p.opts + p.secondary_opts}

def test_readme_is_short_and_about_the_user():
    text = open(README, encoding='utf-8').read()
    assert len(text.splitlines()) <= 200
    for phrase in ('this machine', 'session', 'acceptance', 'UNCONFIRMED', 'shared 2-core'):
        assert phrase not in text, phrase
    assert text.splitlines()[3:5] == ['make demo     # set up .venv (pinned CPU torch) and distil the shipped MNIST teacher (about 7 min)',
        'make test     # set up .venv and run the test suite (what CI runs)']
    for link in re.findall(r'\]\((docs/[^)]+)\)', text):
        assert os.path.isfile(os.path.join(ROOT, link)), link

def test_every_readme_flag_exists():
    commands = readme_commands()
    assert len(commands) >= 6
    for name, argv in commands:
        known = _option_names(CLIS[name], argv)
        flags = [w.split('=')[0] for w in argv if w.startswith('--')]
        assert flags, (name, argv)
        unknown = [f for f in flags if f not in known]
        assert not unknown, (name, argv, unknown)

@pytest.mark.parametrize('name', sorted(CLIS))
def test_help_shows_defaults(name):
    args = ['calc', '--help'] if name == 'fid' else ['--help']
    result = CliRunner().invoke(CLIS[name], args)
    assert result.exit_code == 0, result.output
    assert 'default' in result.output
    if name == 'refine':
        for flag in ('--batch', '--lr', '--glr', '--kimg', '--tick', '--snap', '--seed', '--ema', '--divergence'):
            line = result.output[result.output.index(flag + ' '):].split('\n  --', 1)[0]
            assert 'default' in line, line
        assert 'Examples:' in result.output

def _local_teacher(argv):
    """The --teacher of a refine.py command if it needs no download: gmm: or a shipped pickle."""
    teacher = argv[argv.index('--teacher') + 1] if '--teacher' in argv else None
    if teacher and (teacher.startswith('gmm:') or (teacher.startswith('pretrained/') and '--gen' not in argv)):
        return teacher
    return None

def test_local_readme_commands_run(tmp_path):
    # The commands that need no download (Gaussian mixtures, the shipped MNIST teacher), as dry runs.
    runnable = [(n, a) for n, a in readme_commands() if n == 'refine' and _local_teacher(a)]
    assert len(runnable) >= 4 and any('gmm:ring8' in a for _, a in runnable)
    for name, argv in runnable:
        argv = [str(tmp_path / 'runs') if w == 'runs' else w for w in argv] + ['--dry-run']
        result = CliRunner().invoke(CLIS[name], argv)
        assert result.exit_code == 0, result.output
        assert f'"teacher": "{_local_teacher(argv)}"' in result.output
    assert not (tmp_path / 'runs').exists()

def test_readme_python_snippet_calls_the_api():
    # The nn.Module row's snippet: what it imports exists, and every keyword it passes is one
    # that refine.api.refine takes.
    text = open(README, encoding='utf-8').read()
    blocks = re.findall(r'```python\n(.*?)```', text, re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 3
    tree = ast.parse(blocks[0])
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [('refine.api', ['refine'])]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'refine']
    assert len(calls) == 2
    accepted = set(inspect.signature(api.refine).parameters) | set(run.DEFAULTS)
    for call in calls:
        assert {k.arg for k in call.keywords} <= accepted, ast.dump(call)
    assert 'resume' in {k.arg for k in calls[1].keywords}

def test_div_opt_help_lists_options():
    result = CliRunner().invoke(CLIS['refine'], ['--divergence', 'sid', '--div-opt', 'help'])
    assert result.exit_code == 0
    assert 'alpha' in result.output and 'default 1.2' in result.output and 'sigma_data' not in result.output
