"""Shell completion for ``pvpy``, generated from its own parser (``pvpy completion bash|zsh``).

One bash function, made from the argparse tree: nouns, then verbs, then each verb's
options; paths for everything else, and the saved device names (``pvpy device list
-q``) where a device verb takes one. zsh runs the same function through its
``bashcompinit``. Generated rather than hand-written, so a new verb or option
completes without anyone remembering to; no ``argcomplete``, which would run
the whole CLI's Python start-up at every Tab press and add a dependency.
"""

from __future__ import annotations

import argparse

__all__ = ["completion_script"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """Its long options, and the choices of its positionals (``completion bash``)."""
    words = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for a in parser._actions:
        if not a.option_strings and a.choices and not isinstance(a, argparse._SubParsersAction):
            words += [str(c) for c in a.choices]
    return sorted(words)


def _table(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Completion words by the words before them: "" (nouns), "device" (its verbs),
    "device push" (that verb's options)."""
    table = {"": [*sorted(_subparsers(parser)), *_options(parser)]}
    for noun, sub in _subparsers(parser).items():
        verbs = _subparsers(sub)
        table[noun] = [*sorted(verbs), *_options(sub)] if verbs else _options(sub)
        for verb, leaf in verbs.items():
            table[f"{noun} {verb}"] = _options(leaf)
    return table


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh)."""
    from pvpy._parser import TARGET_VERBS

    table = _table(parser)
    cases = "\n".join(
        f'        "{key}") words="{" ".join(words)}" ;;' for key, words in sorted(table.items())
    )
    devices = "|".join(f'"device {v}"' for v in sorted(TARGET_VERBS))
    body = f"""# pvpy completion ({shell}): eval "$(pvpy completion {shell})"
_pvpy() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} key="" words="" i n=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in -*) continue ;; esac
        [ $n -lt 2 ] && key="${{key:+$key }}${{COMP_WORDS[i]}}" && n=$((n + 1))
    done
    case $key in
{cases}
    esac
    case $key in {devices})
        [[ $cur != -* ]] && words="$words $(pvpy device list -q 2>/dev/null)" ;;
    esac
    if [[ $cur == -* || $n -lt 2 || $key == completion ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _pvpy pvpy
"""
    if shell == "zsh":
        body = "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body
