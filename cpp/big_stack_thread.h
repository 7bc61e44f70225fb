// A thread with a stack we choose. llguidance compiles grammars and computes token
// masks recursively; a deep but legal grammar overflowed the 8 MB default stack and
// killed the host process. Stacks are reserved virtual memory: pages that are
// never touched cost nothing.
#pragma once
#include <pthread.h>

#include <exception>
#include <functional>
#include <stdexcept>

namespace mtllm {

constexpr size_t kGrammarStackBytes = size_t(512) << 20;

class BigStackThread {
public:
    BigStackThread() = default;
    BigStackThread(const BigStackThread&) = delete;
    BigStackThread& operator=(const BigStackThread&) = delete;
    ~BigStackThread() { join(); }

    void start(std::function<void()> fn, size_t stack_bytes) {
        fn_ = std::move(fn);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, stack_bytes);
        int rc = pthread_create(&thread_, &attr, &BigStackThread::trampoline, this);
        pthread_attr_destroy(&attr);
        // Where the address space is capped (ulimit -v), a default stack beats no thread.
        if (rc != 0) rc = pthread_create(&thread_, nullptr, &BigStackThread::trampoline, this);
        if (rc != 0) throw std::runtime_error("cannot start a thread (pthread_create failed)");
        running_ = true;
    }
    bool joinable() const { return running_; }
    void join() {
        if (running_) {
            pthread_join(thread_, nullptr);
            running_ = false;
        }
    }

private:
    static void* trampoline(void* self) {
        static_cast<BigStackThread*>(self)->fn_();
        return nullptr;
    }
    std::function<void()> fn_;
    pthread_t thread_{};
    bool running_ = false;
};

// Runs fn on a fresh thread with a big stack and waits; exceptions cross back.
inline void run_with_big_stack(const std::function<void()>& fn, size_t stack_bytes = kGrammarStackBytes) {
    std::exception_ptr err;
    {
        BigStackThread t;
        t.start([&] {
            try {
                fn();
            } catch (...) {
                err = std::current_exception();
            }
        }, stack_bytes);
    }
    if (err) std::rethrow_exception(err);
}

}  // namespace mtllm
