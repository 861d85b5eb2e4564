"""The NPR instruction and the chat prompt built from it."""
from __future__ import annotations

# The project's own wording of the format rules (DESIGN section 2), appended to the user turn.
NPR_INSTRUCTION = """\
Reason in parallel. Whenever a problem splits into parts that do not depend on each other, write
a guideline that lists them, work on each part separately, then combine the results:
<guideline>
<plan>1: the first independent part</plan>
<plan>2: the second independent part</plan>
</guideline><step>1: work on part 1 only</step><step>2: work on part 2 only</step><takeaway>what the steps give together</takeaway>
Rules: write one <step> per <plan>, in the same order, each starting with its number; a step
cannot see the other steps, so it must not refer to them; write nothing between </step> and the
next <step> or <takeaway>. You may use several such blocks one after another. Finish with the final
answer in \\boxed{}."""


def instruction_text(choice: str) -> str:
    """The text a config's `instruction: npr | none` stands for."""
    if choice not in ("npr", "none"):
        raise ValueError(f"instruction must be 'npr' or 'none', got {choice!r}")
    return NPR_INSTRUCTION if choice == "npr" else ""


def chat_prompt_text(question: str, tokenizer, instruction: str = NPR_INSTRUCTION) -> str:
    """The chat-templated prompt (no system turn; thinking mode off), ending where the
    assistant's response begins."""
    messages = [{"role": "user", "content": f"{question.strip()}\n\n{instruction}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)


def prompt_ids(question: str, tokenizer, instruction: str = NPR_INSTRUCTION) -> list[int]:
    return tokenizer.encode(chat_prompt_text(question, tokenizer, instruction), add_special_tokens=False)
