/* Misuse of the C ABI, built with AddressSanitizer and UndefinedBehaviorSanitizer by
 * ffi/tests/c_smoke.rs: NULL handles and buffers, zero capacities, buffers too small, a
 * pointer that is not a handle, and one model used by 8 threads at once (outputs must equal
 * the sequential run). Every misuse must come back as a status code with a message; the
 * sanitizers must report nothing. Usage: misuse MODEL_DIR. Exit status 0 = all checks held. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rlx.h"

static int failures = 0;
#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s (%s)\n", __FILE__, __LINE__, #cond, \
                    rlx_last_error());                                                \
            failures++;                                                               \
        }                                                                             \
    } while (0)
#define EXPECT(call, status) CHECK((call) == (status))

enum { THREADS = 8, NEW = 12 };

struct job {
    const rlx_model *model;
    uint64_t seed;
    uint32_t tokens[NEW];
    float logprobs[NEW];
    size_t n;
    rlx_status status;
};

static void run(struct job *j) {
    uint32_t prompt[3] = {3, 5, (uint32_t)(7 + j->seed % 5)};
    rlx_sampling_params sp = rlx_sampling_default_params();
    sp.max_new_tokens = NEW;
    sp.seed = j->seed;
    sp.ignore_eos = true;
    j->status = rlx_generate(j->model, prompt, 3, &sp, j->tokens, j->logprobs, NEW, &j->n);
}

static void *thread_main(void *arg) {
    for (int round = 0; round < 20; round++) run((struct job *)arg);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    rlx_model *model = NULL;
    EXPECT(rlx_model_load(argv[1], NULL, &model), RLX_OK);
    if (!model) return 1;

    /* NULL handles and outputs. */
    size_t n = 123;
    uint32_t toks[64];
    float lps[64];
    rlx_sampling_params sp = rlx_sampling_default_params();
    sp.max_new_tokens = 4;
    uint32_t prompt[3] = {3, 5, 7};
    EXPECT(rlx_generate(NULL, prompt, 3, &sp, toks, lps, 4, &n), RLX_NULL_POINTER);
    EXPECT(rlx_generate(model, prompt, 3, &sp, toks, lps, 4, NULL), RLX_NULL_POINTER);
    EXPECT(rlx_tokenize(NULL, "hi", true, toks, 64, &n), RLX_NULL_POINTER);
    EXPECT(rlx_tokenize(model, NULL, true, toks, 64, &n), RLX_NULL_POINTER);
    EXPECT(rlx_logprobs(NULL, prompt, 3, 1.0f, lps, 64, &n), RLX_NULL_POINTER);
    EXPECT(rlx_logprobs(model, NULL, 3, 1.0f, lps, 64, &n), RLX_NULL_POINTER);
    rlx_model_free(NULL);
    rlx_trainer_free(NULL);
    rlx_reward_model_free(NULL);

    /* Zero capacities and buffers too small: the size needed comes back, nothing is written. */
    n = 0;
    EXPECT(rlx_tokenize(model, "hello hello", true, NULL, 0, &n), RLX_BUFFER_TOO_SMALL);
    CHECK(n > 0);
    EXPECT(rlx_logprobs(model, prompt, 3, 1.0f, lps, 1, &n), RLX_BUFFER_TOO_SMALL);
    CHECK(n == 2);
    char text[2];
    n = 0;
    EXPECT(rlx_detokenize(model, prompt, 3, false, text, sizeof text, &n), RLX_BUFFER_TOO_SMALL);
    CHECK(n > sizeof text);
    EXPECT(rlx_generate(model, prompt, 3, &sp, toks, lps, 0, &n), RLX_BUFFER_TOO_SMALL);

    /* Out-of-range ids, absurd lengths, bad numbers. */
    uint32_t bad[2] = {3, 0xFFFFFFFFu};
    EXPECT(rlx_logprobs(model, bad, 2, 1.0f, lps, 64, &n), RLX_OUT_OF_RANGE);
    sp.max_new_tokens = 1u << 30;
    CHECK(rlx_generate(model, prompt, 3, &sp, toks, lps, 64, &n) != RLX_OK);
    sp.max_new_tokens = 4;
    sp.temperature = -1.0f;
    EXPECT(rlx_generate(model, prompt, 3, &sp, toks, lps, 64, &n), RLX_INVALID_ARGUMENT);

    /* A pointer that is not a handle (readable memory, wrong magic). */
    uint64_t not_a_model[8] = {0};
    EXPECT(rlx_generate((const rlx_model *)not_a_model, prompt, 3, &sp, toks, lps, 4, &n),
           RLX_INVALID_ARGUMENT);

    /* 8 threads share the model; each result equals the sequential run with its seed. */
    struct job expected[THREADS], jobs[THREADS];
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) {
        expected[i] = (struct job){.model = model, .seed = (uint64_t)i};
        run(&expected[i]);
        EXPECT(expected[i].status, RLX_OK);
        jobs[i] = (struct job){.model = model, .seed = (uint64_t)i};
        CHECK(pthread_create(&threads[i], NULL, thread_main, &jobs[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        EXPECT(jobs[i].status, RLX_OK);
        CHECK(jobs[i].n == expected[i].n);
        CHECK(memcmp(jobs[i].tokens, expected[i].tokens, sizeof jobs[i].tokens) == 0);
        CHECK(memcmp(jobs[i].logprobs, expected[i].logprobs, sizeof jobs[i].logprobs) == 0);
    }

    rlx_model_free(model);
    if (failures) fprintf(stderr, "%d checks failed\n", failures);
    else printf("misuse: all checks held\n");
    return failures ? 1 : 0;
}
