#!/usr/bin/python3
"""Records golden chat-template renders with Python jinja2 (Debian's python3-jinja2), configured
as Hugging Face's apply_chat_template configures it: ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and the loop controls, raise_exception, and tojson as json.dumps with
ensure_ascii=False. Run once; the output is committed:

  tests/reference/make_chat_template_fixtures.py > tests/fixtures/chat_templates/golden.json

Each case: the template's file, the messages, add_generation_prompt, and the rendered text or
the exception's message.
"""
import json
import os
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "chat_templates")
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "What is a switchyard?"},
     {"role": "assistant", "content": "A place where trains are sorted."},
     {"role": "user", "content": "And a hump yard?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name three rail gauges."}],
    [{"role": "system", "content": "Be kind.\nAlways."},
     {"role": "user", "content": "  spaced  "},
     {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "ünïcødé ✓ \"quotes\" {{ not a tag }}"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "I speak first"}],
    [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}],
]


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def main():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    cases = []
    for name in sorted(os.listdir(HERE)):
        if not name.endswith(".jinja"):
            continue
        with open(os.path.join(HERE, name)) as f:
            template = env.from_string(f.read())
        for messages in CONVERSATIONS:
            for add_generation_prompt in (False, True):
                case = {"template": name, "messages": messages,
                        "add_generation_prompt": add_generation_prompt}
                try:
                    case["rendered"] = template.render(messages=messages,
                                                       add_generation_prompt=add_generation_prompt,
                                                       **SPECIAL)
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                cases.append(case)
    json.dump({"jinja2": jinja2.__version__, "special_tokens": SPECIAL, "cases": cases},
              sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
