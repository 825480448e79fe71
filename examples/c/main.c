/* The four primitives of rlx from C: generate (streaming), log-probs, a gradient step, and a
 * reward score.
 *
 *   rlx_example MODEL [PROMPT]
 *
 * MODEL is an HF folder, a .safetensors file or a .gguf file (for example the default model,
 * models/SmolLM2-135M-Instruct.Q4_1.gguf). Exits non-zero, with rlx's message, on any error. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rlx.h"

#define MAX_NEW 16

static int fail(const char *what, enum rlx_status status) {
    fprintf(stderr, "%s failed: %s (%s)\n", what, rlx_last_error(), rlx_status_string(status));
    return 1;
}

#define CHECK(call)                                   \
    do {                                              \
        enum rlx_status status_ = (call);             \
        if (status_ != RLX_OK) return fail(#call, status_); \
    } while (0)

/* Streaming: print each token's text as it arrives. */
static bool on_token(uint32_t token, float logprob, void *user_data) {
    const struct rlx_model *model = (const struct rlx_model *)user_data;
    char piece[256];
    size_t n = 0;
    (void)logprob;
    if (rlx_detokenize(model, &token, 1, true, piece, sizeof piece, &n) == RLX_OK) {
        fputs(piece, stdout);
        fflush(stdout);
    }
    return true; /* false would stop generation here */
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    const char *question = argc > 2 ? argv[2] : "What is the capital of France?";
    struct rlx_model *model = NULL;
    struct rlx_model_params mp = rlx_model_default_params();
    CHECK(rlx_model_load(path, &mp, &model));
    printf("rlx %s, vocabulary %zu\n", rlx_version_string(), rlx_model_vocab_size(model));

    /* The prompt: the model's chat template when it has one, else the text itself. */
    char text[4096];
    size_t text_len = 0;
    struct rlx_chat_message msg = {"user", question};
    bool chat = rlx_apply_chat_template(model, &msg, 1, true, text, sizeof text, &text_len) == RLX_OK;
    if (!chat) snprintf(text, sizeof text, "%s", question);

    uint32_t prompt[1024];
    size_t n_prompt = 0;
    CHECK(rlx_tokenize(model, text, !chat, prompt, 1024, &n_prompt));

    /* 1. generate, streaming each token. */
    struct rlx_sampling_params sp = rlx_sampling_default_params();
    sp.max_new_tokens = MAX_NEW;
    sp.temperature = 0.0f; /* greedy */
    uint32_t out[MAX_NEW];
    float out_lp[MAX_NEW];
    size_t n_out = 0;
    printf("answer: ");
    CHECK(rlx_generate_stream(model, prompt, n_prompt, &sp, on_token, model, out, out_lp, MAX_NEW,
                              &n_out));
    printf("\n");

    /* 2. log-probs of prompt + answer agree with what generation reported, bit for bit. */
    uint32_t seq[1024 + MAX_NEW];
    memcpy(seq, prompt, n_prompt * sizeof *prompt);
    memcpy(seq + n_prompt, out, n_out * sizeof *out);
    size_t n_seq = n_prompt + n_out;
    float lp[1024 + MAX_NEW];
    size_t n_lp = 0;
    CHECK(rlx_logprobs(model, seq, n_seq, 1.0f, lp, 1024 + MAX_NEW, &n_lp));
    for (size_t i = 0; i < n_out; i++) {
        if (lp[n_prompt - 1 + i] != out_lp[i]) {
            fprintf(stderr, "log-prob %zu differs: %g vs %g\n", i, lp[n_prompt - 1 + i], out_lp[i]);
            return 1;
        }
    }
    printf("log-probs: %zu answer tokens match generation exactly\n", n_out);

    /* 3. two gradient steps (SFT on the answer) lower its loss. */
    struct rlx_trainer_params tp = rlx_trainer_default_params();
    tp.lr = 1e-4f;
    tp.lora_rank = 8; /* LoRA keeps the step cheap on a real model */
    tp.lora_alpha = 16.0f;
    struct rlx_trainer *trainer = NULL;
    CHECK(rlx_trainer_create(path, &tp, &trainer));
    uint8_t mask[1024 + MAX_NEW];
    for (size_t i = 0; i < n_seq; i++) mask[i] = i >= n_prompt;
    struct rlx_step_stats first, second;
    CHECK(rlx_trainer_sft_step(trainer, seq, mask, n_seq, &n_seq, 1, &first));
    CHECK(rlx_trainer_sft_step(trainer, seq, mask, n_seq, &n_seq, 1, &second));
    printf("SFT steps: loss %.4f -> %.4f\n", first.loss, second.loss);
    if (!(second.loss < first.loss)) {
        fprintf(stderr, "the second step did not lower the loss\n");
        return 1;
    }
    rlx_trainer_free(trainer);

    /* 4. a reward score, from a fresh score head (a reward model in training). */
    struct rlx_trainer_params rp = rlx_trainer_default_params();
    rp.head = RLX_HEAD_SCORE;
    rp.lora_rank = 8;
    CHECK(rlx_trainer_create(path, &rp, &trainer));
    struct rlx_model *reward_model = NULL;
    CHECK(rlx_trainer_model(trainer, &reward_model));
    float reward = NAN;
    size_t n_reward = 0;
    CHECK(rlx_reward_score(reward_model, seq, n_seq, &n_seq, 1, &reward, 1, &n_reward));
    printf("reward of the answer (untrained head): %.4f\n", reward);

    /* Misuse is an error, never a crash. */
    if (rlx_logprobs(NULL, seq, n_seq, 1.0f, lp, 1, &n_lp) != RLX_NULL_POINTER) return 1;

    rlx_model_free(reward_model);
    rlx_trainer_free(trainer);
    rlx_model_free(model);
    puts("all checks passed");
    return 0;
}
