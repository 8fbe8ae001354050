"""Gathered logits keep input order under any process count.

accelerate gives the first `n % W` processes one image more and pads the others with a repeat of
their last image; with 3 processes and 10 images that padding sits between slices, where a plain
`gather()[:n]` shifted three rows onto their neighbours' images (1 and 2 processes never showed it).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from accelerate import Accelerator
    from augment import build_eval_transform
    from pipeline.engine.predict import predict_logits

    class Brightness(torch.nn.Module):
        '''Logit 0 is the mean pixel of the image: it tells which image a row came from.'''
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2)

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    n = int(sys.argv[2])
    images = [np.full((8, 8, 1), 10 * i, dtype=np.uint8) for i in range(n)]
    logits = predict_logits(accelerator, Brightness(), images, build_eval_transform(8), torch.zeros(1),
                            torch.ones(1), batch_size=2, workers=0, channels_last=False, progress=False)
    if accelerator.is_main_process:
        np.save(sys.argv[1], logits)
    accelerator.wait_for_everyone()
    accelerator.state.destroy_process_group()  # as the runner does: exiting with gloo's threads alive can abort
""")


def test_three_processes_return_every_image_s_logits_in_input_order(tmp_path):
    script, out = tmp_path / "order.py", tmp_path / "logits.npy"
    script.write_text(SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", "29581"]
    result = subprocess.run(torchrun + [str(script), str(out), "10"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.load(out)
    assert logits.shape == (10, 2)
    np.testing.assert_allclose(logits[:, 0], np.arange(10) * 10 / 255, atol=1e-6)
