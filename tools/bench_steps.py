"""Training steps of teacher and student in one process, plain autograd (no DeepSpeed, no
optimizer step): where a step's CPU time goes, next to ``megadistill bench train``.

Usage: python tools/bench_steps.py [--teacher smollm2|PATH] [--seq-len 2048] [--repeats 2]
Prints CPU seconds per step for: the teacher's forward alone (no grad), the teacher's CE step,
the student's body (hidden states, no head), its stage II step (CE + top-256 KL head against
random targets) and its stage I step (new parameters only), interleaved (the order reversed every
other round), ``repeats`` times.
"""

import argparse

import torch

from megadistill.bench.synthetic import SyntheticModelConfig
from megadistill.bench.timing import measure
from megadistill.bench.train import RandomTopK
from megadistill.stages.align import AttentionProbe
from megadistill.stages.losses import distill_loss
from megadistill.teachers import convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2", help="HF folder or 'smollm2'")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    path = SyntheticModelConfig(teacher=args.teacher).teacher_path()
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    student, _ = convert(teacher, seed=0, window=args.window, num_sinks=4)
    t = args.seq_len
    vocab = teacher.config.vocab_size
    ids = torch.randint(3, vocab, (1, t), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(t)[None]
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    top = RandomTopK((1, t), vocab, 256, seed=0)
    new = set(student.new_parameter_names())
    teacher.train()
    student.train()

    def teacher_forward():
        with torch.no_grad():
            teacher.model(ids)

    def teacher_ce():
        teacher(input_ids=ids, labels=ids).loss.backward()

    def student_body():
        student.model(ids, None, pos).pow(2).mean().backward()

    def stage2():
        def head(hidden, lm_head):
            return distill_loss(
                hidden, lm_head, labels, top.logprobs, top.ids, chunk_size=1024
            ).loss

        student(input_ids=ids, position_ids=pos, head_fn=head).loss.backward()

    def stage1():
        for name, p in student.named_parameters():
            p.requires_grad_(name in new)
        try:
            with AttentionProbe(student) as probe:
                probe.loss(student, ids, pos).backward()
        finally:
            for p in student.parameters():
                p.requires_grad_(True)

    def zero_grad(_: str) -> None:
        teacher.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)

    steps = [teacher_forward, teacher_ce, student_body, stage2, stage1]
    times = measure({f.__name__: f for f in steps}, repeats=args.repeats, after=zero_grad)
    for name, samples in times.items():
        print(f"{name:<16} " + " ".join(f"{x:7.2f}" for x in samples.cpu) + "  CPU s")


if __name__ == "__main__":
    main()
