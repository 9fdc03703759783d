"""Run under ``mpiexec -n K``: one data-parallel training step equals the one-process step.

Every rank builds the ``tiny`` model (float64); the ranks other than 0 then
perturb theirs, so that only ``broadcast_parameters`` can make them equal.
Each rank encodes its share of a global batch, takes the distributed loss,
back-propagates, all-reduces the gradients and steps AdamW. Rank 0 repeats
the step in one process on the whole batch and prints, as JSON, the largest
difference of any parameter after the step, for the SigLIP ring and both CLIP
methods.
"""

import json

import numpy

import tinyclip as tc
from tinyclip import distributed, losses
from tinyclip.models import CLIP, preset

BATCH = 7


def batch_of(config):
    rng = numpy.random.default_rng(7)
    images = rng.normal(size=(BATCH, config.image_size, config.image_size, 3))
    tokens = rng.integers(1, config.vocab_size - 1, (BATCH, config.context_length))
    tokens[:, -1] = config.eos_id
    return images, tokens


def train_step(model, images, tokens, loss):
    optimizer = tc.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    image_emb, text_emb, log_scale, bias = model(images, tokens)
    value = loss(image_emb, text_emb, log_scale, bias)
    value.backward()
    return optimizer, value


def main():
    comm = distributed.world()
    for family, method in (("siglip", "ring"), ("clip", "ring"), ("clip", "gather")):
        overrides = {"init_bias": -5.0} if family == "siglip" else {}
        config = preset("tiny", **overrides)
        images, tokens = batch_of(config)
        sizes = [BATCH // comm.size + (rank < BATCH % comm.size) for rank in range(comm.size)]
        start = sum(sizes[:comm.rank])
        mine = slice(start, start + sizes[comm.rank])

        def distributed_loss(image_emb, text_emb, log_scale, bias):
            if family == "siglip":
                return distributed.siglip_loss(image_emb, text_emb, log_scale, bias, comm=comm)
            return distributed.clip_loss(image_emb, text_emb, log_scale, comm=comm, method=method)

        model = CLIP(config, dtype="float64", seed=3)
        if comm.rank != 0:
            for parameter in model.parameters():
                parameter.data += 0.5
        distributed.broadcast_parameters(model.parameters(), comm)
        optimizer, share = train_step(model, images[mine], tokens[mine], distributed_loss)
        distributed.all_reduce_gradients(model.parameters(), comm)
        optimizer.step()
        total = comm.all_reduce(numpy.array([float(share.data)]))[0]

        if comm.rank == 0:
            reference = CLIP(config, dtype="float64", seed=3)

            def single_loss(image_emb, text_emb, log_scale, bias):
                if family == "siglip":
                    return losses.siglip_loss(image_emb, text_emb, log_scale, bias)
                return losses.clip_loss(image_emb, text_emb, log_scale)

            reference_optimizer, expected = train_step(reference, images, tokens, single_loss)
            reference_optimizer.step()
            difference = max(float(numpy.abs(a.data - b.data).max())
                             for a, b in zip(model.parameters(), reference.parameters()))
            print(json.dumps({"size": comm.size, "case": f"{family}-{method}", "parameters": difference,
                              "loss": abs(total - float(expected.data))}), flush=True)


if __name__ == "__main__":
    main()
